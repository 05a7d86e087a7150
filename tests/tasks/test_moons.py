"""Three moons: the data and the training sets against the official definition, the init scale,
the cached rollout against recomputation, both error alignments on a toy sequence, the
protocol's held-out sets and deviations, and a tiny end-to-end run."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from memcore import cli
from memcore.tasks import moons, moons_model, protocol
from memcore.tasks.moons_eval import horizon_errors, rollout

F = Fraction

ARGSORT = """
import json, math, sys
from functools import reduce
from itertools import combinations
import numpy as np
# the official planets.py: LCMs of the 35 sets at one decimal, then np.argsort's first 9
ps = list(combinations([0.5, 1, 1.5, 2, 2.5, 3, 3.5], 3))
lcm = lambda a, b: math.lcm(int(round(a, 1) * 10), int(round(b, 1) * 10)) / 10
order = np.argsort(np.array([reduce(lcm, p) for p in ps]))[: len(ps) // 4 + 1]
json.dump([list(ps[i]) for i in order], sys.stdout)
"""


def _argsort_sets(env=None) -> list:
    out = subprocess.run([sys.executable, "-c", ARGSORT], capture_output=True, text=True,
                         check=True, env=env)
    return [tuple(F(p).limit_denominator(2) for p in s) for s in json.loads(out.stdout)]


def test_training_sets_follow_the_official_argsort():
    from numpy._core._multiarray_umath import __cpu_dispatch__

    # numpy's portable introsort (its SIMD dispatch off), as on the official Apple-silicon run
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(__cpu_dispatch__)}
    assert _argsort_sets(env) == list(moons.SET_ORDERS["scalar"])
    assert _argsort_sets() in [list(o) for o in moons.SET_ORDERS.values()]  # this machine's
    scalar, simd = (set(o) for o in moons.SET_ORDERS.values())
    assert scalar ^ simd == {(1, F(3, 2), 2), (F(3, 2), 2, 3)}  # one training set apart
    for order in moons.SET_ORDERS:
        train, held = moons.period_sets(order)
        assert held == moons.HELD_OUT and len(train) == 8 and held not in train
        lcms = [moons.lcm(s) for s in [*train, held]]
        assert lcms == sorted(lcms) and lcms[-1] == 6  # the nine smallest, by LCM
        assert sorted(moons.lcm(s) for s in moons.all_period_sets())[:9] == lcms
        assert train[moons.EVAL_TRAIN_INDEX] == (F(1, 2), 1, F(5, 2))  # the plot's set
    with pytest.raises(ValueError, match="set_order must be one of"):
        moons.period_sets("sorted")


def test_sample_follows_each_period():
    ps = (F(1, 2), F(2), F(7, 2))
    x = moons.sample(np.random.default_rng(0), [ps] * 3, 200)
    assert x.shape == (3, 200, 6) and x.dtype == np.float32
    z = x[..., 0::2] + 1j * x[..., 1::2]  # one unit complex number per moon
    np.testing.assert_allclose(np.abs(z), 1.0, atol=1e-6)
    step = np.angle(z[:, 1:] / z[:, :-1])  # phase advance per step: 2 pi / (44.4 p)
    want = np.array([2 * np.pi / (moons.STEPS_PER_UNIT * float(p)) for p in ps])
    want = np.angle(np.exp(1j * want))
    np.testing.assert_allclose(step, np.broadcast_to(want, step.shape), atol=1e-5)


def test_init_is_the_projected_uniform_of_the_official_complex_linear():
    # U(+-1/sqrt(2a)) on a real [2b, 2a] matrix, projected: each entry the mean of two draws
    re, im = moons_model.complex_init(96, 96, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(2 * 96)
    for w in (re, im):
        assert float(w.abs().max()) <= bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(6), rel=0.04)
        # a triangular law (kurtosis 2.4), not the uniform's (1.8)
        k = float(((w - w.mean()) ** 4).mean() / w.var() ** 2)
        assert k == pytest.approx(2.4, abs=0.15)
    a, b = moons_model.initial_weights(3), moons_model.initial_weights(3)
    assert all(np.array_equal(a[k], b[k]) for k in a) and set(a) == {
        f"{m}.{p}" for m in moons_model.MAPS for p in ("re", "im")}
    model = moons_model.MoonsMemory(3, seed=3)
    np.testing.assert_array_equal(model.psi.im.detach().numpy(), a["psi.im"])


def test_complex_linear_is_complex_multiplication():
    gen = torch.Generator().manual_seed(0)
    lin = moons_model.ComplexLinear(*moons_model.complex_init(3, 2, gen))
    x = torch.randn(4, 6)
    W = (lin.re + 1j * lin.im).detach().numpy()
    z = x[:, 0::2].numpy() + 1j * x[:, 1::2].numpy()
    y = lin(x).detach().numpy()
    assert y.shape == (4, 4)
    np.testing.assert_allclose(y[:, 0::2] + 1j * y[:, 1::2], z @ W.T, rtol=1e-5, atol=1e-6)


def test_memory_reads_only_the_past():
    model = moons_model.MoonsMemory(3, seed=0)
    x = torch.as_tensor(moons.sample(np.random.default_rng(1), [moons.HELD_OUT] * 2, 40))
    y = model(x)
    x2 = x.clone()
    x2[:, 30:] = 0.0  # changing x_t for t >= 30 must not change predictions before t = 29
    y2 = model(x2)
    torch.testing.assert_close(y[:, :29], y2[:, :29])
    assert not torch.allclose(y[:, 29:], y2[:, 29:])
    assert torch.all(y[:, 0] == 0)  # the first position has no memory yet
    with pytest.raises(ValueError, match="heads must be 1 or 3"):
        moons_model.MoonsMemory(2)


def test_clipped_loss():
    class Const(torch.nn.Module):
        def forward(self, x):
            return x + torch.tensor([2.0, 0.1, 0, 0, 0, 0])

    x = torch.zeros(1, 1, 6)
    loss, _ = moons.clipped_loss(Const(), x, x)
    assert float(loss) == pytest.approx((0.25 + 0.01) / 6)


@pytest.mark.parametrize("heads", [1, 3])
def test_cached_rollout_is_the_recomputed_one(heads):
    model = moons_model.MoonsMemory(heads, seed=2)
    with torch.no_grad():  # train a little away from the init's near-uniform attention
        model.phi.re.mul_(3.0)
    x = moons.sample(np.random.default_rng(4), [moons.HELD_OUT] * 3, 30)
    got = dict(rollout(model, x, [1, 4, 17], horizon=6))
    with torch.no_grad():
        for c in (1, 4, 17):
            cur = torch.as_tensor(x[:, :c])
            want = []
            for _ in range(7):  # a whole forward per step, on the generated sequence
                want.append(model(cur)[:, -1])
                cur = torch.cat([cur, want[-1][:, None]], 1)
            np.testing.assert_allclose(got[c], torch.stack(want, 1).numpy(), atol=2e-5,
                                       err_msg=f"c={c}")
    # the official cached generate: pairs from the last context position on have value 0
    off = dict(rollout(model, x, [4], horizon=3, official_cache=True))[4]
    np.testing.assert_allclose(off[:, 0], got[4][:, 0], atol=1e-6)  # x^_c: the context's own
    with torch.no_grad():
        seq = torch.cat([torch.as_tensor(x[:, :4]), torch.as_tensor(off[:, :3])], 1)
        k = model.key(seq).transpose(1, 2)  # [B, H, 7, E]
        v = torch.zeros_like(k)
        v[:, :, :3] = model.value(seq[:, 1:4]).transpose(1, 2)
        for i in range(1, 4):  # x^_{c+i} read by the key of position c + i - 1
            t = 3 + i
            w = torch.softmax(k[:, :, t:t + 1] @ k[:, :, :t].transpose(2, 3), -1)
            want = model.out((w @ v[:, :, :t])[:, :, 0].reshape(3, 6))
            np.testing.assert_allclose(off[:, i], want.numpy(), atol=2e-5)
    assert not np.allclose(off[:, 2:], got[4][:, 2:4], atol=1e-4)
    with pytest.raises(ValueError, match="context lengths must lie in"):
        list(rollout(model, x, [0]))


def test_both_alignments_on_a_toy_sequence():
    x = np.arange(40, dtype=np.float64)[None, :, None] * np.ones((2, 1, 3))  # x_t = t
    c, h = 10, 5
    exact = x[:, c:c + h + 1]  # x^_{c+i} = x_{c+i}: a perfect forecast
    lagging = x[:, c - 1:c + h]  # x^_{c+i} = x_{c+i-1}: repeats the last input
    assert horizon_errors(exact, x, c, h) == {"paper": 0.0, "official_plot": 1.0}
    assert horizon_errors(lagging, x, c, h) == {"paper": 1.0, "official_plot": 0.0}
    with pytest.raises(ValueError, match="generated steps"):
        horizon_errors(exact[:, :h], x, c, h)


TINY = dict(steps=2, batch_size=2, length=40, eval_sequences=2, context_step=6,
            val_sequences=3, val_context_step=10)


def test_held_out_sets_and_deviations():
    cfg = moons.MoonsConfig(**TINY)
    test, val = moons.held_out_sequences(cfg)
    assert list(test) == ["train {0.5, 1, 2.5}", "held-out {1, 2, 3}"]
    assert val.shape == (3, 40, 6)
    protocol.check_disjoint((val,), (np.concatenate(list(test.values())),))
    again = moons.held_out_sequences(cfg)[1]  # the same for every model and seed
    np.testing.assert_array_equal(val, again)
    full = protocol.Sweep(moons.LRS, moons.SEEDS)
    official = moons.deviations(moons.OFFICIAL, full, "torch")
    assert len(official) == 2 and "streaming state" in official[0]
    assert "validation error" in official[1]
    tiny = moons.deviations(cfg, protocol.Sweep([1e-2], [0]), "jax")
    for text in ("sequence length 40 instead of 800", "every 6th context", "1 learning rate",
                 "1 seed", "--backend jax"):
        assert any(text in d for d in tiny), text
    assert not any("streaming" in d for d in moons.deviations(
        moons.MoonsConfig(official_cache=True), full, "torch"))


def test_moons_tiny_run(tmp_path, capsys):
    out = tmp_path / "moons"
    argv = ["moons", "--steps", "2", "--batch", "2", "--length", "40", "--eval-sequences", "2",
            "--context-step", "6", "--val-sequences", "3", "--lrs", "1e-2", "3e-2", "--seeds",
            "5", "--log-every", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["contexts"] == [1, 7, 13] and res["held_out"] == "{1, 2, 3}"
    assert any("1 seed" in d for d in res["deviations"])
    for r in res["models"].values():
        assert r["lr"] in (1e-2, 3e-2) and r["seeds"] == [5] and len(r["by_lr"]) == 2
        for key in ("held_out_error", "held_out_error_std", "val_error", "val_error_std"):
            assert math.isfinite(r[key])
        for field in ("error", "error_official_plot"):
            assert set(r[field]) == set(res["marks"]) and all(
                len(e) == 3 for e in r[field].values())
        assert r["held_out_error"] == pytest.approx(np.mean(r["error"]["held-out {1, 2, 3}"]),
                                                    abs=1e-4)
        assert np.array(r["weights"]["phi"]).shape == (3, 3)
    assert "held out" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "moons.png").stat().st_size > 0
        assert (out / "moons_weights.png").stat().st_size > 0
    # a second command reuses the finished runs; another configuration is refused by name
    assert cli.main(argv) == 0
    assert "4 finished run(s) found" in capsys.readouterr().err
    assert cli.main([*argv[:2], "3", *argv[3:]]) == 2
    assert "steps differs" in capsys.readouterr().err
    assert cli.main(["moons", "--length", "10"]) == 2
