"""Three moons: the data against its definition, the model's pieces, a tiny end-to-end run."""

import importlib.util
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from memcore import cli
from memcore.tasks import moons


def test_period_sets():
    train, held = moons.period_sets()
    assert held == (1, 2, 3) and moons.lcm(held) == 6
    assert len(train) == 8 and held not in train and len(set(train)) == 8
    assert all(len(s) == 3 and set(s) <= set(moons.PERIODS) for s in train)
    assert max(moons.lcm(s) for s in train) <= moons.lcm(held)
    assert moons.lcm((Fraction(1, 2), Fraction(3, 2), Fraction(5, 2))) == Fraction(15, 2)


def test_sample_follows_each_period():
    ps = (Fraction(1, 2), Fraction(2), Fraction(7, 2))
    x = moons.sample(np.random.default_rng(0), [ps] * 3, 200)
    assert x.shape == (3, 200, 6) and x.dtype == np.float32
    z = x[..., 0::2] + 1j * x[..., 1::2]  # one unit complex number per moon
    np.testing.assert_allclose(np.abs(z), 1.0, atol=1e-6)
    step = np.angle(z[:, 1:] / z[:, :-1])  # phase advance per step: 2 pi / (44.4 p)
    want = np.array([2 * np.pi / (moons.STEPS_PER_UNIT * float(p)) for p in ps])
    want = np.angle(np.exp(1j * want))
    np.testing.assert_allclose(step, np.broadcast_to(want, step.shape), atol=1e-5)


def test_complex_linear_is_complex_multiplication():
    lin = moons.ComplexLinear(3, 3, torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)
    W = (lin.re + 1j * lin.im).detach().numpy()
    z = x[:, 0::2].numpy() + 1j * x[:, 1::2].numpy()
    y = lin(x).detach().numpy()
    np.testing.assert_allclose(y[:, 0::2] + 1j * y[:, 1::2], z @ W.T, rtol=1e-5, atol=1e-6)


def test_memory_reads_only_the_past():
    model = moons.MoonsMemory(3, seed=0)
    x = torch.as_tensor(moons.sample(np.random.default_rng(1), [moons.HELD_OUT] * 2, 40))
    y = model(x)
    x2 = x.clone()
    x2[:, 30:] = 0.0  # changing x_t for t >= 30 must not change predictions before t = 29
    y2 = model(x2)
    torch.testing.assert_close(y[:, :29], y2[:, :29])
    assert not torch.allclose(y[:, 29:], y2[:, 29:])
    assert torch.all(y[:, 0] == 0)  # the first position has no memory yet
    with pytest.raises(ValueError, match="heads must be 1 or 3"):
        moons.MoonsMemory(2)


def test_clipped_loss():
    class Const(torch.nn.Module):
        def forward(self, x):
            return x + torch.tensor([2.0, 0.1, 0, 0, 0, 0])

    x = torch.zeros(1, 1, 6)
    loss, _ = moons.clipped_loss(Const(), x, x)
    assert float(loss) == pytest.approx((0.25 + 0.01) / 6)
    assert math.isfinite(float(loss))


def test_moons_tiny_run(tmp_path, capsys):
    out = tmp_path / "moons"
    argv = ["moons", "--steps", "3", "--batch", "4", "--length", "60", "--eval-sequences", "2",
            "--context-step", "15", "--log-every", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"1 head", "3 heads"}
    assert res["contexts"] == [1, 16, 31]
    for r in res["models"].values():
        for errs in r["error"].values():
            assert len(errs) == 3 and all(0 <= e < 10 for e in errs)
    assert res["held_out"] == "{1, 2, 3}"
    assert "held out" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "moons.png").stat().st_size > 0
    assert cli.main(["moons", "--length", "10"]) == 2
