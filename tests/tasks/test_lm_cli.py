"""`memcore lm` end to end on a slice of tinyshakespeare, and its errors."""

import importlib.util
import json
import os

import numpy as np
import pytest

from memcore import cli
from memcore.tasks import lm

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                           "tinyshakespeare.txt")
TINY = ["--seq-len", "8", "--d-model", "16", "--batch", "2", "--steps", "2",
        "--eval-windows", "2", "--log-every", "1"]


@pytest.fixture
def text(tmp_path):
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"tinyshakespeare not found at {SHAKESPEARE}")
    path = tmp_path / "slice.txt"
    path.write_bytes(open(SHAKESPEARE, "rb").read()[:4000])
    return str(path)


def test_lm_tiny_run(text, tmp_path, capsys):
    out = tmp_path / "lm"
    models = ["transformer", "bmojo"]
    assert cli.main(["lm", "--text", text, "--models", *models, *TINY, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == models
    for r in res["models"].values():
        per = np.array(r["loss_by_position"])
        assert per.shape == (4 * 8,) and np.all(np.isfinite(per)) and np.all(per > 0)
        assert r["loss_within_L"] == pytest.approx(per[:8].mean(), abs=1e-4)
    assert "L..4L" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "lm.png").stat().st_size > 0


def test_loss_by_position_is_per_position_cross_entropy():
    import torch

    import memcore

    cfg = lm.LMConfig(seq_len=4, d_model=8, n_heads=1, eval_windows=3, eval_factor=2)
    spec = lm.lm_spec("transformer", cfg)
    model = lm.NextByte(memcore.realize(spec, backend="torch"))
    data = np.random.default_rng(0).integers(0, 256, 200)
    per = lm.loss_by_position(model, data, cfg, seed=1)
    w = torch.as_tensor(lm._windows(data, 3, 9, np.random.default_rng([1, 9])))
    logp = torch.log_softmax(model(w[:, :-1]), -1)
    want = -logp.gather(-1, w[:, 1:, None])[..., 0].mean(0)
    np.testing.assert_allclose(per, want.detach().numpy(), rtol=1e-5)


def test_lm_bad_arguments(tmp_path, capsys):
    assert cli.main(["lm", "--text", str(tmp_path / "missing.txt"), *TINY]) == 2
    assert "no such file" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    assert cli.main(["lm", "--text", str(small), *TINY]) == 2
    assert "needs at least" in capsys.readouterr().err
    assert cli.main(["lm", "--text", str(small), "--models", "rnn", *TINY]) == 2
    assert "unknown model" in capsys.readouterr().err
