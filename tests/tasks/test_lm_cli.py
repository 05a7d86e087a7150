"""`memcore lm`: the split and its windows, the per-position losses and their buckets, the
n-gram baselines and the protocol's fields end to end on a slice of tinyshakespeare, and its
errors."""

import importlib.util
import json
import os

import numpy as np
import pytest

from memcore import cli
from memcore.tasks import lm, protocol

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                           "tinyshakespeare.txt")
TINY = ["--seq-len", "8", "--d-model", "16", "--batch", "2", "--steps", "2", "--eval-every",
        "1", "--eval-windows", "12", "--val-windows", "6", "--log-every", "1"]


@pytest.fixture
def text(tmp_path):
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE}")
    path = tmp_path / "slice.txt"
    path.write_bytes(open(SHAKESPEARE, "rb").read()[:8000])
    return str(path)


def test_validation_and_test_windows_come_from_disjoint_splits(text):
    cfg = lm.LMConfig(seq_len=8, eval_windows=12, val_windows=6)
    parts, val, test, overlap = lm.held_out(text, cfg)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [7200, 400, 400]
    assert val.shape == (6, 9) and test.shape == (12, 33) and not overlap
    data = lm.read_bytes(text)
    np.testing.assert_array_equal(test[0], data[7600:7633])  # the first and last bytes
    np.testing.assert_array_equal(test[-1], data[-33:])
    starts = [int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
        parts["test"], 33) == w, axis=1))[0]) for w in test]
    assert all(b - a >= 33 for a, b in zip(starts, starts[1:], strict=False))  # no overlap
    np.testing.assert_array_equal(val[0], data[7200:7209])  # validation: 7200 .. 7600
    np.testing.assert_array_equal(val[-1], data[7591:7600])
    _, _, _, overlap = lm.held_out(text, lm.LMConfig(seq_len=8, eval_windows=30))
    assert overlap and any("overlap" in d for d in lm.deviations(
        lm.LMConfig(seq_len=8, eval_windows=30), protocol.Sweep([1e-3], [0]), True))


def test_nll_is_per_position_cross_entropy_and_buckets_carry_standard_errors():
    import torch

    cfg = lm.LMConfig(seq_len=4, d_model=8, n_heads=1, bucket=3)
    model = lm.next_token_model("torch", lm.lm_spec("transformer", cfg), 0)
    w = np.random.default_rng(0).integers(0, 256, (3, 9))
    got = lm.nll_torch(model, w, batch=2)
    logp = torch.log_softmax(model(torch.as_tensor(w[:, :-1])), -1)
    want = -logp.gather(-1, torch.as_tensor(w[:, 1:, None]))[..., 0]
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5)
    nll = np.array([[1.0, 2, 3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10]])
    per = lm.window_buckets(nll, 3)
    np.testing.assert_allclose(per, [[2, 5, 7.5], [4, 7, 9.5]])
    stats = lm.bucket_stats(per, 3, 8)
    assert stats["start"] == [0, 3, 6] and stats["end"] == [3, 6, 8]
    np.testing.assert_allclose(stats["loss"], [3, 6, 8.5])
    np.testing.assert_allclose(stats["se"], [1, 1, 1])  # std (ddof 1) sqrt(2) / sqrt(2)


def test_lm_tiny_run(text, tmp_path, capsys):
    out = tmp_path / "lm"
    models = ["transformer", "bmojo"]
    argv = ["lm", "--text", text, "--models", *models, *TINY, "--lrs", "1e-3", "3e-3",
            "--seed", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == models
    assert set(res["baselines"]) == {"2-gram", "3-gram", "4-gram"}
    assert any("12 test windows" in d for d in res["deviations"])
    assert any("PG-19" in d for d in res["deviations"])  # the paper's setup, in every mode
    four = res["baselines"]["4-gram"]["loss_within_L"]
    for r in [*res["models"].values(), *res["baselines"].values()]:
        per = np.array(r["loss_by_position"])
        assert per.shape == (32,) and np.all(np.isfinite(per)) and np.all(per > 0)
        assert r["loss_within_L"] == pytest.approx(per[:8].mean(), abs=1e-4)
        assert len(r["buckets"]["loss"]) == 2 and all(se > 0 for se in r["buckets"]["se"])
        assert r["val_loss"] > 0
    for r in res["models"].values():
        assert r["lr"] in (1e-3, 3e-3) and r["seeds"] == [1] and len(r["by_lr"]) == 2
        assert r["beats_4gram"] == (r["loss_within_L"] < four)
        for key in ("loss_within_L_std", "val_loss_std", "loss_L_to_4L_std"):
            assert key in r
        assert all(run["best_step"] in (1, 2) for run in r["runs"])
    assert "L..4L" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "lm.png").stat().st_size > 0


def test_lm_bad_arguments(tmp_path, capsys):
    assert cli.main(["lm", "--text", str(tmp_path / "missing.txt"), *TINY]) == 2
    assert "no such file" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    assert cli.main(["lm", "--text", str(small), *TINY]) == 2
    assert "needs at least" in capsys.readouterr().err
    assert cli.main(["lm", "--text", str(small), "--models", "rnn", *TINY]) == 2
    assert "unknown model" in capsys.readouterr().err
