"""`memcore mqar` end to end on tiny configurations: the protocol's results and deviations in
every mode, resume, the dry run, and the errors."""

import importlib.util
import json
import re

import pytest

from memcore import cli
from memcore.tasks import mqar_configs, mqar_run
from memcore.tasks.runs import checkpoint_meta

TINY = ["--quick", "--steps", "2", "--seq-len", "16", "--kv", "2", "--vocab", "64",
        "--batch", "4", "--val-examples", "8", "--test-examples", "8", "--d-model", "16",
        "--log-every", "1", "--threads", "1"]


def _overrides():
    return {"steps": 2, "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 64, "batch_size": 4,
            "val_examples": 8, "test_examples": 8, "d_model": 16}


def test_mqar_quick_tiny_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    # two single-thread worker processes; results come back in the order asked for
    assert cli.main(["mqar", *TINY, "--lrs", "3e-3", "--out", str(out), "--jobs", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "quick" and list(res["models"]) == list(mqar_configs.MODELS)
    for name, r in res["models"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0, name
        assert r["accuracy_std"] == 0.0 and r["seeds"] == [0] and r["lr"] == 3e-3, name
        # one training budget for every model of the table
        assert r["budget_steps"] == 2 and r["steps"] == 2 and r["memory_bytes"] > 0, name
        assert [(run["lr"], run["seed"]) for run in r["runs"]] == [(3e-3, 0)]
    # the deviations from Zoology: the sweep's shortfalls and the command-line overrides
    dv = " | ".join(res["deviations"])
    assert "1 learning rate(s) [0.003]" in dv and "1 seed(s) [0]" in dv
    assert "vocabulary 64" in dv and "rotary positions" in dv and "validation" in dv
    assert res["overrides"]["seq_len"] == 16
    assert res["config"]["seq_len"] == 16 and res["config"]["short_conv"] == 3
    assert res["config"]["d_state"] == 16  # Zoology's (Mamba's default)
    mem = {n: r["memory_bytes"] for n, r in res["models"].items()}
    assert mem["bmojo"] > mem["bmojo_f"] > mem["transformer_window"]
    logs = [json.loads(s) for s in
            (out / "mamba" / "lr0.003-seed0" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2]
    assert all("eval" in r for r in logs if "loss" not in r)
    printed = capsys.readouterr()
    assert "deviations from Zoology" in printed.err and "bmojo" in printed.out
    # a worker process's run equals the same run here
    here = mqar_run.run(["transformer"], lrs=[3e-3], overrides=_overrides(), quiet=True)
    a, b = here["models"]["transformer"]["runs"][0], res["models"]["transformer"]["runs"][0]
    assert a["accuracy"] == b["accuracy"] and a["val_accuracy"] == b["val_accuracy"]
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)  # threads change sums
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "mqar.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--models", "lstm"], "unknown model"),
    (["--seq-len", "16", "--kv", "8"], "seq_len must be >= 4 \\* num_kv_pairs"),
    (["--backend", "jax"], "--threads sets torch's CPU threads"),  # TINY has --threads
    (["--backend", "numpy"], "--backend must be one of"),
    (["--device", "nowhere"], "--device must be a torch device"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--jobs", "0"], "--jobs must be an int >= 1"),
    (["--window", "4", "8"], "--window takes one value outside --sweep memory"),
    (["--sweep", "memory"], "--quick and --sweep are two modes"),
    (["--lrs", "1e-3", "1e-3"], "--lrs must be distinct"),
    (["--lr", "1e-3", "--lrs", "1e-3"], "--lr and --lrs"),
    (["--seeds", "-1"], "--seeds must be one or more ints >= 0"),
    (["--pattern", "MX"], "pattern must be letters M"),
])
def test_mqar_bad_arguments(argv, message, capsys):
    assert cli.main(["mqar", *TINY, *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_dry_run_shows_the_overrides_and_the_deviations(capsys):
    assert cli.main(["mqar", *TINY, "--dry-run", "--window", "3", "--models", "bmojo",
                     "transformer_window"]) == 0
    text = capsys.readouterr().out
    assert "'seq_len': 16" in text and "'window': 3" in text
    assert "bmojo: 2 x bmojo(window 3, chunk 8" in text and "attention(window 3)" in text
    assert "L=16 kv=2 V=64 d=16 batch=4 steps=2" in text
    assert "6 training runs planned" in text and "deviations from Zoology" in text


def test_full_mode_is_zoology_figure2():
    variants, sweep, _ = mqar_configs.plan(["transformer"], mode="full")
    assert len(variants) == 4 * 4 and sweep.lrs == mqar_configs.FULL_LRS
    assert len(sweep.seeds) >= 3
    grid = {(c.seq_len, c.num_kv_pairs, c.batch_size) for _, _, c, _ in variants}
    assert grid == {(64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)}
    assert {c.d_model for *_, c, _ in variants} == {64, 128, 256, 512}
    assert sorted(round(x, 8) for x in sweep.lrs) == [1e-4, 4.6416e-4, 2.15443e-3, 1e-2]
    c = variants[0][2]
    assert (c.vocab_size, c.train_examples, c.test_examples, c.epochs, c.weight_decay,
            c.early_stop, c.short_conv, c.d_state) == (8192, 100_000, 3_000, 64, 0.1, 0.99, 0,
                                                       16)


def test_full_mode_tiny_records_its_deviations(tmp_path):
    """One collapsed point of the grid, with a fixed training set of 12 examples."""
    over = {**_overrides(), "vocab_size": 128, "steps": 0, "train_examples": 12, "epochs": 2,
            "batch_size": 8}
    res = mqar_run.run(["transformer"], mode="full", lrs=[1e-3, 3e-3], seeds=[0],
                       overrides=over, out_dir=str(tmp_path), quiet=True)
    (point,) = res["points"]
    assert point["steps"] == 4 and point["budget_steps"] == 4  # 2 epochs of ceil(12 / 8)
    assert point["lr"] in (1e-3, 3e-3) and len(point["by_lr"]) == 2
    dv = " | ".join(res["deviations"])
    assert "4 steps over 12 fixed examples" in dv and "2 learning rate(s)" in dv
    assert json.loads((tmp_path / "results.json").read_text())["deviations"] == res["deviations"]


def _tiny(**flags):
    """TINY with the values of some of its flags changed (``d_model="8"``)."""
    argv = list(TINY)
    for flag, value in flags.items():
        argv[argv.index("--" + flag.replace("_", "-")) + 1] = value
    return argv


def test_mqar_resume_continues_and_refuses_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    rest = ["--out", str(out), "--models", "transformer", "--lrs", "3e-3"]
    assert cli.main(["mqar", *TINY, *rest]) == 0
    first = json.loads((out / "results.json").read_text())["models"]["transformer"]
    # the end of training wrote a checkpoint although --checkpoint-every is 0
    ckpt = out / "transformer" / "lr0.003-seed0" / "checkpoint.safetensors"
    at_ckpt = checkpoint_meta(str(ckpt))["history"]["seconds"]
    assert cli.main(["mqar", *TINY, *rest, "--resume"]) == 0  # nothing left: same result
    again = json.loads((out / "results.json").read_text())["models"]["transformer"]
    assert again["runs"][0]["accuracy"] == first["runs"][0]["accuracy"]
    assert again["runs"][0]["final_loss"] == first["runs"][0]["final_loss"]
    assert again["runs"][0]["seconds"] >= round(at_ckpt, 1)  # they count on
    log = (out / "transformer" / "lr0.003-seed0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in log if "loss" in s] == [1, 2]  # not logged twice
    capsys.readouterr()
    for argv, name in (([*TINY, *rest, "--seed", "1"], "sweep.seeds"),
                       ([*TINY, *rest, "--lrs", "1e-2"], "sweep.lrs"),  # the last --lrs wins
                       ([*_tiny(d_model="8"), *rest], "config.d_model"),
                       ([*_tiny(vocab="96"), *rest], "config.vocab_size")):
        assert cli.main(["mqar", *argv, "--resume"]) == 2
        assert f"--resume: {name} differs from the run under" in capsys.readouterr().err
    assert cli.main(["mqar", *TINY, "--resume"]) == 2  # no --out: a clear error


def test_finished_runs_are_kept_and_reused(tmp_path, monkeypatch, capsys):
    """Each finished run is kept under its folder as it ends, so a command stopped part way
    (a killed sweep) loses none: the same command again reuses them and trains nothing."""
    out = tmp_path / "run"
    rest = ["--out", str(out), "--models", "transformer", "mamba", "--lrs", "3e-3", "1e-2"]
    assert cli.main(["mqar", *TINY, *rest]) == 0
    first = json.loads((out / "results.json").read_text())["models"]
    kept = json.loads((out / "mamba" / "lr0.01-seed0" / "run.json").read_text())
    assert kept["result"]["accuracy"] == next(r for r in first["mamba"]["runs"]
                                              if r["lr"] == 1e-2)["accuracy"]
    (out / "results.json").unlink()  # as if the command had been killed before its end

    def no_training(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(mqar_run, "run_one", no_training)
    capsys.readouterr()
    assert cli.main(["mqar", *TINY, *rest]) == 0
    assert "4 finished run(s) found" in capsys.readouterr().err
    again = json.loads((out / "results.json").read_text())["models"]
    assert again == first
    # a kept run of another configuration is refused by name, not reused
    assert cli.main(["mqar", *_tiny(d_model="8"), *rest]) == 2
    assert "config.d_model differs" in capsys.readouterr().err


def test_readme_main_job_table_is_the_kept_results():
    """The README's main-job table is the quick job's printout: each row's numbers equal the
    run's copy of results.json kept beside the plot (docs/figures/mqar_quick_results.json)."""
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    res = json.loads((root / "docs/figures/mqar_quick_results.json").read_text())
    assert res["mode"] == "quick"
    readme = (root / "README.md").read_text()
    block = readme.split("What it printed", 1)[1].split("```", 2)[1]
    rows = {line.split()[0]: line.split() for line in block.splitlines()[3:] if line.strip()}
    assert list(rows) == list(res["models"])
    for name, r in res["models"].items():
        acc, std, val, lr, mem = rows[name][1:6]
        assert float(acc) == round(r["accuracy"], 4), name
        assert float(val) == round(r["val_accuracy"], 4), name
        assert float(lr) == r["lr"] and int(mem.replace(",", "")) == r["memory_bytes"], name
