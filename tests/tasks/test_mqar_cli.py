"""`memcore mqar` end to end on a tiny configuration, and its errors."""

import importlib.util
import json

import pytest

from memcore import cli
from memcore.tasks import mqar_run

TINY = ["--quick", "--steps", "2", "--seq-len", "16", "--kv", "2", "--vocab", "64",
        "--batch", "4", "--test-examples", "8", "--d-model", "16", "--log-every", "1",
        "--threads", "1"]


def _overrides():
    return {"steps": 2, "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 64, "batch_size": 4,
            "test_examples": 8, "d_model": 16}


def test_mqar_quick_tiny_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    # two single-thread worker processes; results come back in the order asked for
    assert cli.main(["mqar", *TINY, "--out", str(out), "--jobs", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == list(mqar_run.MODELS)
    for name, r in res["models"].items():
        assert 0.0 <= r["accuracy"] <= 1.0, name
        assert r["state_bytes"] > 0 and r["params"] > 0 and r["steps"] == 2
    # the deviations from Zoology are recorded, including the command-line overrides
    assert res["deviations"][:len(mqar_run.QUICK_DEVIATIONS)] == mqar_run.QUICK_DEVIATIONS
    assert "overridden" in res["deviations"][-1]
    assert res["config"]["seq_len"] == 16 and res["config"]["short_conv"] == 3
    # memory footprint: the full KV cache grows with L, the window and the recurrent state
    # do not; bmojo holds more than bmojo_f (its store)
    sb = {n: r["state_bytes"] for n, r in res["models"].items()}
    assert sb["bmojo"] > sb["bmojo_f"]
    logs = [json.loads(s) for s in (out / "mamba" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2]
    printed = capsys.readouterr()
    assert "deviations from Zoology" in printed.err and "bmojo" in printed.out
    # a worker process's model equals the same model trained here
    here = mqar_run.run(["transformer"], overrides=_overrides(), quiet=True)
    assert here["models"]["transformer"]["accuracy"] == res["models"]["transformer"]["accuracy"]
    assert here["models"]["transformer"]["final_loss"] == pytest.approx(
        res["models"]["transformer"]["final_loss"], rel=1e-5)  # thread count changes sums
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "mqar.png").stat().st_size > 0


def test_state_bytes_grow_only_for_unbounded_memories():
    from dataclasses import replace

    import numpy as np
    import torch

    from memcore.tasks import mqar
    from memcore.tasks.stack import TaskLM

    base = replace(mqar_run.QUICK, d_model=16, window=4, capacity=8, chunk=4, select=2)
    sizes = {}
    for name in ("transformer", "transformer_window", "mamba", "bmojo"):
        m = TaskLM(mqar_run.model_spec(name, base), short_conv=3)
        x16 = torch.as_tensor(mqar.generate(1, 512, 16, 2, np.random.default_rng(0))[0])
        x32 = torch.as_tensor(mqar.generate(1, 512, 32, 2, np.random.default_rng(0))[0])
        sizes[name] = (m.state_bytes(x16), m.state_bytes(x32))
    assert sizes["transformer"][1] > sizes["transformer"][0]
    for name in ("transformer_window", "mamba", "bmojo"):
        assert sizes[name][0] == sizes[name][1], name


@pytest.mark.parametrize("argv,message", [
    (["--models", "lstm"], "unknown model"),
    (["--seq-len", "16", "--kv", "8"], "seq_len must be >= 4 \\* num_kv_pairs"),
    (["--backend", "jax"], "--threads sets torch's CPU threads"),  # TINY has --threads
    (["--backend", "numpy"], "--backend must be one of"),
    (["--device", "nowhere"], "--device must be a torch device"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--jobs", "0"], "--jobs must be an int >= 1"),
])
def test_mqar_bad_arguments(argv, message, capsys):
    assert cli.main(["mqar", *TINY, *argv]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_full_mode_is_zoology_figure2():
    plan = mqar_run.full_plan(["transformer"])
    assert len(plan) == 4 * 4 * 4
    grid = {(c.seq_len, c.num_kv_pairs, c.batch_size) for _, c in plan}
    assert grid == {(64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)}
    assert {c.d_model for _, c in plan} == {64, 128, 256, 512}
    assert sorted({round(c.lr, 8) for _, c in plan}) == [1e-4, 4.6416e-4, 2.15443e-3, 1e-2]
    c = plan[0][1]
    assert (c.vocab_size, c.train_examples, c.test_examples, c.epochs, c.weight_decay,
            c.early_stop, c.short_conv) == (8192, 100_000, 3_000, 64, 0.1, 0.99, 0)


def test_mqar_resume_continues_from_checkpoints(tmp_path):
    out = tmp_path / "run"
    base = [*TINY, "--out", str(out), "--models", "transformer", "--checkpoint-every", "1"]
    assert cli.main(["mqar", *base]) == 0
    first = json.loads((out / "results.json").read_text())["models"]["transformer"]
    assert cli.main(["mqar", *base, "--resume"]) == 0  # nothing left to train: same result
    again = json.loads((out / "results.json").read_text())["models"]["transformer"]
    assert again["accuracy"] == first["accuracy"] and again["final_loss"] == first["final_loss"]
    assert cli.main(["mqar", *TINY, "--resume"]) == 2  # no --out: a clear error


def test_full_mode_runs_one_point_of_the_sweep_with_a_fixed_training_set():
    from dataclasses import replace

    import numpy as np

    name, cfg = mqar_run.full_plan(["transformer"])[0]
    cfg = replace(cfg, vocab_size=128, d_model=16, train_examples=12, test_examples=8,
                  batch_size=8, epochs=2)
    assert cfg.total_steps == 4  # 2 epochs of ceil(12 / 8) batches
    batch = mqar_run._batches(cfg, 0)
    seen = np.concatenate([batch(0)[0], batch(1)[0]])
    assert len(np.unique(seen, axis=0)) == 12  # one epoch visits every fixed example once
    r = mqar_run.run_one(name, cfg, quiet=True)
    assert r["steps"] == 4 and 0.0 <= r["accuracy"] <= 1.0
