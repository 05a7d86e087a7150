"""Rotary angles at large absolute positions (DESIGN 6, long streams): the float32 forms of
every tree stay at float32 error against the float64 reference, for streams started from a
state whose position is near 2^20, 2^24 and 2^31, in the parallel and the streaming form, on
the plain paths and on the windowed-readout kernels (Triton and Pallas, interpreted on a CPU).
The tables themselves are checked against angles reduced exactly with rationals."""

from __future__ import annotations

import math
from fractions import Fraction

import array_api_compat
import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
import jax.numpy as jnp  # noqa: E402
from memcore.backends.jax import rotary as jax_rotary  # noqa: E402
from memcore.backends.jax.layers import windowed as jax_windowed  # noqa: E402
from memcore.backends.torch import rotary as torch_rotary  # noqa: E402
from memcore.spec.constants import ROPE_BASE  # noqa: E402
from memcore.spec.reference import rotary as ref_rotary  # noqa: E402

import memcore  # noqa: E402
from memcore import spec as S  # noqa: E402
from memcore.testing import relative_rmse  # noqa: E402

F32_RMSE = 1e-5  # DESIGN 6: float32 against the float64 reference
# 2*pi to 40 digits: angles reduced exactly in rationals, then rounded once
TWO_PI = Fraction("6.283185307179586476925286766559005768394338798750")
# awkward starts: past 2^20 mid-chunk, across 2^24 (where float32 stops holding every
# integer) and just below 2^31 (the largest int32 position)
STARTS = {"2^20": 2**20 + 1, "2^24": 2**24 - 5, "2^31": 2**31 - 20}
T = 12  # tokens per call: the window (4) and the chunk (4) turn over several times
SPECS = {
    "bmojo": S.bmojo(16, 2, window=4, chunk=4, select=2, capacity=3, d_state=2),
    "transformer_window": S.transformer(16, 2, window=4),
}


def _exact_tables(positions, E):
    """cos and sin [T, E // 2] of p * inv_freq (the float64 frequencies of the convention),
    the product reduced modulo 2*pi in rationals before one rounding to float64."""
    half = E // 2
    inv = [ROPE_BASE ** (-i * (2.0 / (2 * half))) for i in range(half)]
    cos, sin = np.empty((len(positions), half)), np.empty((len(positions), half))
    for a, p in enumerate(positions):
        for i, f in enumerate(inv):
            turns = Fraction(int(p)) * Fraction(f) / TWO_PI
            ang = float(turns - math.floor(turns)) * 2 * math.pi
            cos[a, i], sin[a, i] = math.cos(ang), math.sin(ang)
    return cos, sin


def _unit_pairs(E):
    """x [1, 2, 1, E]: rotated, its coordinates are cos and sin of each angle (pairs (i, i+half))
    for row 0 and -sin, cos for row 1; an odd last coordinate stays."""
    half = E // 2
    x = np.zeros((1, 2, 1, E))
    x[0, 0, 0, :half] = 1.0
    x[0, 1, 0, half:2 * half] = 1.0
    if E % 2:
        x[0, :, 0, -1] = 0.5
    return x


def _rotated(tree, x, p, dtype):
    """rope of x [1, 2, 1, E] with both rows at position p, by one tree, as float64 numpy."""
    xx = x.transpose(0, 2, 1, 3).astype(dtype)  # [1, 1, 2, E]: one token, two heads
    if tree == "reference":
        got = ref_rotary.rope(np, xx, np.array([p], dtype=np.int64))
    elif tree == "reference_jax_no_x64":  # float64 absent: the tables are made on the host
        with jax.enable_x64(False):
            xj = jnp.asarray(xx)
            got = np.asarray(ref_rotary.rope(array_api_compat.array_namespace(xj), xj,
                                             jnp.asarray([p], jnp.int32)))
    elif tree == "torch":
        got = torch_rotary.rope(torch.from_numpy(xx), p).numpy()
    elif tree == "torch_step":
        tabs = torch_rotary.step_tables(p, x.shape[-1], getattr(torch, np.dtype(dtype).name),
                                        torch.device("cpu"))
        got = torch_rotary.rope(torch.from_numpy(xx), 0, tabs).numpy()
    elif tree == "jax":
        got = np.asarray(jax.jit(jax_rotary.rope)(jnp.asarray(xx), jnp.asarray([p], jnp.int32)))
    else:  # "jax_no_x64": the exact reduction needs no 64-bit type
        with jax.enable_x64(False):
            got = np.asarray(jax.jit(jax_rotary.rope)(jnp.asarray(xx),
                                                      jnp.asarray([p], jnp.int32)))
    return np.asarray(got, dtype=np.float64)[0, 0]  # [2, E]


TABLE_CASES = [(tree, dt) for tree in ("reference", "torch", "torch_step", "jax")
               for dt in (np.float32, np.float64)]
TABLE_CASES += [("jax_no_x64", np.float32), ("reference_jax_no_x64", np.float32)]


@pytest.mark.parametrize(("tree", "dtype"), TABLE_CASES,
                         ids=[f"{t}-{np.dtype(d).name}" for t, d in TABLE_CASES])
def test_tables_match_exact_angles(tree, dtype):
    """Each tree's rotation at positions up to 2^31 - 1 equals the exactly reduced angle to
    the dtype's rounding: in float32 a few units in 2^-24, not a multiple of the position."""
    E = 9  # four frequencies, and an odd coordinate left alone
    x = _unit_pairs(E)
    positions = [0, 1, 7, 2**20 + 3, 2**24 - 1, 2**24 + 1, 2**27 + 12345, 2**31 - 1]
    cos, sin = _exact_tables(positions, E)
    for a, p in enumerate(positions):
        got = _rotated(tree, x, p, dtype)
        want = np.stack([np.concatenate([cos[a], sin[a], [0.5]]),
                         np.concatenate([-sin[a], cos[a], [0.5]])])
        err = float(np.max(np.abs(got - want)))
        # float32: 8 units of 2^-24 (the reduced angle's and cos/sin's rounding); float64: the
        # product p * f (f <= 1) rounds by up to p * 2^-53
        tol = 2.0**-21 if dtype == np.float32 else max(p, 1) * 2.0**-52
        assert err <= tol, f"{tree} {np.dtype(dtype).name} at {p}: table error {err:.2e}"


def _params(spec):
    """float32-representable parameters, as float32 and as float64."""
    p32 = {k: np.asarray(v, np.float32) for k, v in memcore.init(spec, seed=0).items()}
    return p32, {k: v.astype(np.float64) for k, v in p32.items()}


def _at(backend, layer, start, dtype):
    """The empty state of ``layer`` with its position counter set to ``start``."""
    if backend == "jax":
        state = layer.init_state(2, dtype=jnp.dtype(dtype))
        return eqx.tree_at(lambda s: s.pos, state, jnp.asarray(start, jnp.int32))
    state = layer.init_state(2, dtype=torch.float32 if backend == "torch" else dtype)
    state["pos"] = start
    return state


def _run(backend, layer, x, start, dtype, streaming):
    """y [B, T, D] as float64 numpy of a call (or of T steps) from position ``start``."""
    state = _at(backend, layer, start, dtype)
    conv = {"torch": torch.from_numpy, "jax": jnp.asarray}.get(backend, np.asarray)

    def out(y):
        return np.asarray(y.detach() if backend == "torch" else y)

    if not streaming:
        y, end = layer(conv(x), state)
        ys = [out(y)]
    else:
        ys = []
        for t in range(x.shape[1]):
            y_t, state = layer.step(conv(x[:, t]), state)
            ys.append(out(y_t)[:, None])
        end = state
    pos = end.pos if backend == "jax" else end["pos"]
    assert int(pos) == start + x.shape[1]
    return np.concatenate(ys, axis=1).astype(np.float64)


def _inputs(spec):
    return np.random.default_rng(11).standard_normal((2, T, spec.d_model)).astype(np.float32)


@pytest.mark.parametrize("streaming", [False, True], ids=["parallel", "streaming"])
@pytest.mark.parametrize("start", list(STARTS))
@pytest.mark.parametrize("backend", ["reference", "torch", "jax"])
@pytest.mark.parametrize("name", list(SPECS))
def test_float32_at_large_positions(name, backend, start, streaming):
    spec, pos = SPECS[name], STARTS[start]
    p32, p64 = _params(spec)
    x = _inputs(spec)
    oracle = memcore.realize(spec, backend="reference", params=p64)
    want = _run("reference", oracle, x.astype(np.float64), pos, np.float64, streaming)
    layer = memcore.realize(spec, backend=backend, params=p32)
    got = _run(backend, layer, x, pos, np.float32, streaming)
    err = relative_rmse(got, want)
    assert err <= F32_RMSE, f"{name} {backend} at {start}: relative RMSE {err:.2e}"


@pytest.mark.parametrize("start", ["2^20", "2^24"])
def test_triton_readout_at_large_positions(start, monkeypatch):
    """The Triton windowed readout receives q and k already rotated: forced onto the kernel,
    a float32 bmojo at a large position stays at float32 error against float64."""
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    import memcore.kernels.triton.windowed_readout as k_attention

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    kernel = k_attention.windowed_readout
    monkeypatch.setattr(k_attention, "windowed_readout", counted)
    monkeypatch.setenv("MEMCORE_KERNELS", "triton")
    spec, pos = SPECS["bmojo"], STARTS[start]
    p32, p64 = _params(spec)
    x = _inputs(spec)
    oracle = memcore.realize(spec, backend="reference", params=p64)
    want = _run("reference", oracle, x.astype(np.float64), pos, np.float64, False)
    got = _run("torch", memcore.realize(spec, backend="torch", params=p32), x, pos,
               np.float32, False)
    assert calls, "the Triton windowed readout was not called"
    err = relative_rmse(got, want)
    assert err <= F32_RMSE, f"triton at {start}: relative RMSE {err:.2e}"


def test_pallas_readout_at_large_positions():
    """As the Triton case, on the JAX layer with implementation="pallas" (interpreted); one
    compiled call serves both starts (the position is traced)."""
    pytest.importorskip("jax.experimental.pallas")
    spec = SPECS["bmojo"]
    p32, p64 = _params(spec)
    x = _inputs(spec)
    oracle = memcore.realize(spec, backend="reference", params=p64)
    layer = memcore.realize(spec, backend="jax", params=p32)
    params = {k: jnp.asarray(v) for k, v in p32.items()}

    def run(p, xx, s):
        return jax_windowed.forward(spec, p, xx, s, implementation="pallas")[0]

    compiled = None
    for start in ("2^20", "2^24"):
        pos = STARTS[start]
        state = _at("jax", layer, pos, np.float32)
        args = (params, jnp.asarray(x), {**state.arrays, "pos": state.pos})
        if compiled is None:
            traced = jax.jit(run).trace(*args)
            assert str(traced.jaxpr).count("pallas_call[") >= 1, "no Pallas kernel traced"
            # the check compares numbers, not compiler output: XLA's cheapest settings
            compiled = traced.lower().compile(compiler_options={
                "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
        got = np.asarray(compiled(*args), np.float64)
        want = _run("reference", oracle, x.astype(np.float64), pos, np.float64, False)
        err = relative_rmse(got, want)
        assert err <= F32_RMSE, f"pallas at {start}: relative RMSE {err:.2e}"
