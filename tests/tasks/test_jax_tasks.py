"""Every task end to end with ``--backend jax``, against the same command with ``--backend
torch``: the two backends train the same model on the same batches, so they report the same
numbers (float32 rounding apart). Tiny configurations: seconds each."""


import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("equinox")
pytest.importorskip("optax")

from memcore import cli  # noqa: E402
from memcore.tasks import lm, moons, mqar_run, regbench  # noqa: E402

MQAR = ["mqar", "--quick", "--steps", "2", "--seq-len", "16", "--kv", "2", "--vocab", "64",
        "--batch", "4", "--val-examples", "8", "--test-examples", "8", "--d-model", "16",
        "--log-every", "1", "--models", "transformer", "--lrs", "3e-3"]
MQAR_OVERRIDES = {"steps": 2, "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 64,
                  "batch_size": 4, "val_examples": 8, "test_examples": 8, "d_model": 16}


def test_mqar_cli(capsys):
    """The command line with --backend jax; the same run through the API with torch (the
    logs and checkpoints are checked in test_jax_train.py)."""
    assert cli.main([*MQAR, "--backend", "jax"]) == 0
    printed = capsys.readouterr().out
    pt = mqar_run.run(["transformer"], lrs=[3e-3], overrides=MQAR_OVERRIDES, quiet=True)
    b = pt["models"]["transformer"]
    row = next(line.split() for line in printed.splitlines() if line.startswith("transformer"))
    # model, accuracy, std, val, lr, memory bytes, params, seconds: as the torch run's
    assert float(row[1]) == pytest.approx(b["accuracy"], abs=1e-4)
    assert float(row[3]) == pytest.approx(b["val_accuracy"], abs=1e-4)
    assert row[5:7] == [f"{b['memory_bytes']:,}", f"{b['params']:,}"]
    jx = mqar_run.run(["transformer"], lrs=[3e-3], overrides=MQAR_OVERRIDES, quiet=True,
                      backend="jax")
    a = jx["models"]["transformer"]
    assert jx["backend"] == "jax" and pt["backend"] == "torch"
    ra, rb = a["runs"][0], b["runs"][0]
    assert ra["steps"] == rb["steps"] == 2
    assert ra["final_loss"] == pytest.approx(rb["final_loss"], rel=1e-5)
    assert (ra["accuracy"], ra["val_accuracy"]) == (rb["accuracy"], rb["val_accuracy"])


def _both(run, *args, **kwargs) -> tuple[dict, dict]:
    return tuple(run(*args, backend=b, quiet=True, log_every=0, **kwargs)
                 for b in ("jax", "torch"))


def test_lm(tmp_path):
    text = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    words = [b"the", b"moon", b"turns", b"and", b"a", b"store", b"keeps", b"tokens"]
    text.write_bytes(b" ".join(words[i] for i in rng.integers(0, len(words), 900)))
    cfg = lm.LMConfig(seq_len=8, d_model=16, n_layers=1, batch_size=2, steps=2, eval_windows=4)
    jx, pt = _both(lm.run, str(text), ["transformer"], cfg)
    a, b = jx["models"]["transformer"], pt["models"]["transformer"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    np.testing.assert_allclose(a["loss_by_position"], b["loss_by_position"], rtol=1e-4)
    assert len(a["loss_by_position"]) == 32 and a["params"] == b["params"]


def test_moons():
    cfg = moons.MoonsConfig(steps=2, batch_size=4, length=60, eval_sequences=2,
                            context_step=15)
    jx, pt = _both(moons.run, cfg, heads=(3,))
    a, b = jx["models"]["3 heads"], pt["models"]["3 heads"]
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
    assert a["error"].keys() == b["error"].keys()
    for k in a["error"]:
        assert len(a["error"][k]) == 3
        np.testing.assert_allclose(a["error"][k], b["error"][k], rtol=1e-3, err_msg=k)


def test_regbench():
    cfg = regbench.RegBenchConfig(steps=1, batch_size=2, train_dfas=4, test_dfas=3,
                                  max_string_len=4, d_model=16, n_layers=1)
    jx, pt = _both(regbench.run, ["transformer"], cfg)
    a, b = jx["models"]["transformer"], pt["models"]["transformer"]
    assert jx["time_bucket"] == 64  # recorded: JAX pads batch lengths (unlabelled)
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
    assert a["tvd"] == pytest.approx(b["tvd"], rel=1e-4)


@pytest.mark.parametrize("argv,message", [
    ([*MQAR, "--backend", "jax", "--threads", "1"], "--threads sets torch's CPU threads"),
    ([*MQAR, "--backend", "jax", "--device", "tpu"], "--device must be 'cpu', 'cuda'"),
    ([*MQAR, "--backend", "mxnet"], "--backend must be one of"),
])
def test_bad_arguments(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_torchrun_is_refused_under_jax(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main([*MQAR, "--backend", "jax"]) == 2
    assert "WORLD_SIZE=2" in capsys.readouterr().err
