"""DESIGN 6: causality holds for every value, finite or not, on the Pallas kernels (interpreted
on the CPU, forced with ``implementation="pallas"`` or ``MEMCORE_KERNELS=pallas``).

A NaN or an infinity put into one input at position t must leave every kernel output before t
finite and equal to the clean run's (float64, <= 1e-12 relative); the kernel's output must equal
the plain-JAX streaming fold wherever either is finite, with both non-finite at the same places,
and so must a split call (prefix, then suffix from the state). T = 20 spans two of the kernels'
16-step tiles, so a poison reaches both the tile it lies in and the next one.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
import nonfinite  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from jaxcheck import params64, scan_steps  # noqa: E402
from memcore.backends.jax import selective_scan as SS  # noqa: E402
from memcore.backends.jax import windowed_readout as WR  # noqa: E402
from memcore.backends.jax.realize import realize  # noqa: E402
from nonfinite import POISONS, assert_prefix_clean  # noqa: E402
from nonfinite import poison as _poison  # noqa: E402

from memcore import spec as S  # noqa: E402

FORM_RTOL = 1e-10  # the kernel against the plain-JAX streaming form where finite (float64)
assert_same_where_finite = functools.partial(nonfinite.assert_same_where_finite, rtol=FORM_RTOL)
assert_states_match = functools.partial(nonfinite.assert_states_match, rtol=FORM_RTOL)
EXAMPLES = 20
T = 20


def _index(data, shape, t: int, time_axis: int) -> tuple:
    idx = [data.draw(st.integers(0, n - 1)) for n in shape]
    idx[time_axis] = t
    return tuple(idx)


# --- the windowed-readout kernel through the primitive's function ------------------------------

@functools.partial(jax.jit, static_argnums=(1, 2))
def _readout_fold(arrays, window, fading):
    """The plain-JAX streaming form over the [B, T, H, E] inputs, one ``lax.scan``."""
    state = WR.windowed_readout_state(arrays["q"], window, fading=fading)

    def body(st_, xs):
        o, st_ = WR.windowed_readout_step(state=st_, window=window,
                                          **{n + "_t": a for n, a in xs.items()})
        return st_, o

    state, outs = jax.lax.scan(body, state, {n: jnp.swapaxes(a, 0, 1)
                                             for n, a in arrays.items()})
    return jnp.swapaxes(outs, 0, 1), state


@functools.partial(jax.jit, static_argnums=(2, 3))
def _readout_kernel(arrays, state, window, pos):
    """The primitive on the kernel, compiled (the interpreter's eager ops cost more); the
    state's position is static, as the kernel path reads it outside jit."""
    if state is not None:
        state = {**state, "pos": pos}
    return WR.windowed_readout(**arrays, window=window, initial_state=state,
                               return_final_state=True, implementation="pallas")


@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_windowed_readout_kernel_poison_is_causal(t, value, data):
    """Raw and fading windows (the store is the bmojo layer's case below)."""
    window, fading = 3, True
    rng = np.random.default_rng(7)
    names = ["q", "k", "v"] + (["fading_k", "fading_v"] if fading else [])
    arrays = {n: rng.standard_normal((2, T, 2, 3)) for n in names}
    name = data.draw(st.sampled_from(names), label="input")
    bad = _poison(arrays, name, _index(data, arrays[name].shape, t, 1), value)

    def run(a, lo=0, hi=T, state=None):
        cut = {n: jnp.asarray(v[:, lo:hi]) for n, v in a.items()}
        return _readout_kernel(cut, state, window, 0 if state is None else state["pos"])

    o_clean, _ = run(arrays)
    o, state = run(bad)
    assert_prefix_clean(o, o_clean, t, axis=1, what="o (kernel)")
    o_fold, s_fold = _readout_fold({n: jnp.asarray(v) for n, v in bad.items()}, window, fading)
    assert_same_where_finite(o, o_fold, "o (kernel vs fold of windowed_readout_step)")
    assert_states_match(state, s_fold, "final state")
    o1, s1 = run(bad, 0, T // 2)
    o2, _ = run(bad, T // 2, T, {n: a for n, a in s1.items() if n != "pos"} | {"pos": T // 2})
    assert_same_where_finite(np.concatenate([o1, o2], axis=1), o_fold, "o (kernel, split)")


@functools.partial(jax.jit, static_argnames=("implementation",))
def _full(q, k, v, implementation):
    return WR.windowed_readout(q, k, v, window=None, implementation=implementation)


@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_full_attention_kernel_poison_is_causal(t, value, data):
    """window=None: the kernel against the plain-JAX form (whose fold the JAX tests check)."""
    rng = np.random.default_rng(8)
    arrays = {n: rng.standard_normal((1, T, 2, 3)) for n in ("q", "k", "v")}
    name = data.draw(st.sampled_from(sorted(arrays)), label="input")
    bad = _poison(arrays, name, _index(data, arrays[name].shape, t, 1), value)

    def run(a, implementation):
        return _full(**{n: jnp.asarray(v) for n, v in a.items()}, implementation=implementation)

    o = run(bad, "pallas")
    assert_prefix_clean(o, run(arrays, "pallas"), t, axis=1, what="o (kernel)")
    assert_same_where_finite(o, run(bad, "jax"), "o (kernel vs plain JAX)")


# --- the selective-scan kernel ------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(3,))
def _scan_fold(arrays, A, h0, softplus, D, delta_bias):
    def body(h, xs):
        y, h = SS.step_core(h, xs["u"], xs["delta"], A, xs["B"], xs["C"], D, xs["z"],
                            delta_bias, softplus)
        return h, y

    hT, ys = jax.lax.scan(body, h0, {n: jnp.moveaxis(a, -1, 0) for n, a in arrays.items()})
    return jnp.moveaxis(ys, 0, -1), hT


@jax.jit
def _scan_kernel(c, A, D, bias, h):
    return SS.selective_scan(c["u"], c["delta"], A, c["B"], c["C"], D=D, z=c["z"],
                             delta_bias=bias, delta_softplus=True, initial_state=h,
                             return_final_state=True, implementation="pallas")


@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_selective_scan_kernel_poison_is_causal(t, value, data):
    rng = np.random.default_rng(9)
    Bt, Dc, N = 2, 4, 2
    arrays = {"u": rng.standard_normal((Bt, Dc, T)), "delta": rng.standard_normal((Bt, Dc, T)),
              "z": rng.standard_normal((Bt, Dc, T)), "B": rng.standard_normal((Bt, 2, N, T)),
              "C": rng.standard_normal((Bt, 2, N, T))}
    A = jnp.asarray(-np.exp(rng.standard_normal((Dc, N))))
    D, bias = (jnp.asarray(rng.standard_normal(Dc)) for _ in range(2))
    h0 = jnp.asarray(rng.standard_normal((Bt, Dc, N)))
    name = data.draw(st.sampled_from(sorted(arrays)), label="input")
    bad = _poison(arrays, name, _index(data, arrays[name].shape, t, -1), value)

    def run(a, h, lo, hi):
        return _scan_kernel({n: jnp.asarray(v[..., lo:hi]) for n, v in a.items()}, A, D, bias, h)

    y, hT = run(bad, h0, 0, T)
    assert_prefix_clean(y, run(arrays, h0, 0, T)[0], t, axis=-1, what=f"y (poisoned {name})")
    y_fold, h_fold = _scan_fold({n: jnp.asarray(v) for n, v in bad.items()}, A, h0, True, D,
                                bias)
    assert_same_where_finite(y, y_fold, "y (kernel vs fold of the step)")
    assert_same_where_finite(hT, h_fold, "final state (kernel vs fold)")
    y1, h1 = run(bad, h0, 0, T // 2)
    y2, h2 = run(bad, h1, T // 2, T)
    assert_same_where_finite(jnp.concatenate([y1, y2], axis=-1), y_fold, "y (kernel, split)")
    assert_same_where_finite(h2, h_fold, "final state (kernel, split)")


# --- a realized layer on the kernels: scan, raw and fading windows, and the store --------------

LAYER = S.bmojo(4, 2, window=3, chunk=4, select=2, capacity=3, d_state=2)
_CLEAN: dict = {}


@contextlib.contextmanager
def _kernels(mode: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMCORE_KERNELS", mode)
        yield


def _fresh(layer):
    return layer.init_state(2, dtype=jnp.float64)


@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, channel=st.integers(0, LAYER.d_model - 1))
def test_bmojo_on_kernels_poison_is_causal(t, value, channel):
    if not _CLEAN:
        params = params64(LAYER, seed=1)
        x = np.random.default_rng(10).standard_normal((2, T, LAYER.d_model))
        with _kernels("pallas"):
            y_clean, _ = realize(LAYER, params)(jnp.asarray(x), _fresh(realize(LAYER, params)))
        _CLEAN.update(params=params, x=x, y=np.asarray(y_clean))
    layer = realize(LAYER, _CLEAN["params"])
    xb = _CLEAN["x"].copy()
    xb[0, t, channel] = value
    with _kernels("pallas"):
        y, state = layer(jnp.asarray(xb), _fresh(layer))
        y1, s1 = layer(jnp.asarray(xb[:, :T // 2]), _fresh(layer))
        y2, s2 = layer(jnp.asarray(xb[:, T // 2:]), s1)
    assert_prefix_clean(y[:1], _CLEAN["y"][:1], t, axis=1, what="y (kernels)")
    assert_same_where_finite(y[1:], _CLEAN["y"][1:], "y of the clean batch row")
    y_fold, s_fold = scan_steps(layer, jnp.asarray(xb), _fresh(layer))
    assert_same_where_finite(y, y_fold, "y (kernels vs fold of step)")
    ref = layer.to_reference_state
    assert_states_match(ref(state), ref(s_fold), "final state (kernels vs fold)")
    assert_same_where_finite(np.concatenate([y1, y2], axis=1), y_fold, "y (kernels, split)")
    assert_states_match(ref(s2), ref(s_fold), "final state (kernels, split)")
