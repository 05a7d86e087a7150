"""The hand-written backward of the JAX selective scan (``selective_scan_vjp.fused_scan``)
against ``jax.grad`` of the autodiff path (``autodiff_core``) and of the reference, in float64
(<= 1e-12): every argument's gradient, with and without D, z, delta_bias and the softplus,
grouped B/C, chunk layouts from one step to several chunks with a partial tail, the backward
split into groups of chunks, and a cotangent on h_T alone. Then jit, vmap and grad-of-grad,
float32 accumulation, and causality of the gradients for non-finite inputs: a NaN or an
infinity at position t leaves every gradient of a loss on the outputs before t as in the clean
run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcheck import rel_err
from memcore.backends.jax import selective_scan as S
from memcore.backends.jax import selective_scan_vjp as V
from memcore.spec.reference import selective_scan as R

GRAD_RTOL = 1e-12
L = 8  # small chunk so that short sequences cover every layout
LENGTHS = {"one_step": 1, "under_one_chunk": 5, "partial_tail": 19, "whole_chunks": 24}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")
PER_POSITION = ("u", "delta", "B", "C", "z")


def _args(T, groups=None, seed=0, Bt=2, Dc=4, N=3):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal
    shape = (Bt, N, T) if groups is None else (Bt, groups, N, T)
    return dict(u=r((Bt, Dc, T)), delta=r((Bt, Dc, T)), A=-np.exp(r((Dc, N))), B=r(shape),
                C=r(shape), D=r(Dc), z=r((Bt, Dc, T)), delta_bias=r(Dc), h0=r((Bt, Dc, N)))


def _weights(a, seed=1):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(a["u"].shape)),
            jnp.asarray(rng.standard_normal(a["h0"].shape)))


def _fused(softplus=True, chunk=L):
    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        return S.scan_core(u, delta, A, B, C, D, z, delta_bias, softplus, h0, chunk=chunk)
    return f


def _autodiff(softplus=True, chunk=L):
    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        return S.autodiff_core(u, delta, A, B, C, D, z, delta_bias, softplus, h0, chunk=chunk)
    return f


def _reference(softplus=True):
    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        return R.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=softplus,
                                initial_state=h0, return_final_state=True)
    return f


def _grads(fn, a, wy, wh, present=NAMES):
    """Gradients of sum(y wy) + sum(h_T wh) in every argument named in ``present`` (the others
    passed as None)."""
    def loss(*xs):
        kw = dict(zip(present, xs, strict=True))
        kw.setdefault("h0", jnp.zeros(a["h0"].shape))  # the op passes zeros for no state
        y, hT = fn(*(kw.get(n) for n in NAMES))
        return jnp.sum(y * wy) + (0.0 if wh is None else jnp.sum(hT * wh))

    xs = [jnp.asarray(a[n]) for n in present]
    return dict(zip(present, jax.grad(loss, tuple(range(len(xs))))(*xs), strict=True))


def _assert_close(got, want, rtol=GRAD_RTOL):
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert rel_err(got[name], w) <= rtol, (name, rel_err(got[name], w))


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("T", LENGTHS.values(), ids=LENGTHS.keys())
def test_gradients_match_autodiff_and_reference(T, groups):
    a = _args(T, groups)
    wy, wh = _weights(a)
    got = _grads(_fused(), a, wy, wh)
    _assert_close(got, _grads(_autodiff(), a, wy, wh))
    _assert_close(got, _grads(_reference(), a, wy, wh))


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("present", [("u", "delta", "A", "B", "C"),
                                     ("u", "delta", "A", "B", "C", "D", "h0"),
                                     ("u", "delta", "A", "B", "C", "z", "delta_bias")],
                         ids=["bare", "D_h0", "z_bias"])
def test_optional_arguments(present, softplus):
    a = _args(13, seed=2)
    if not softplus:  # keep dt > 0 so that the states stay bounded
        a["delta"] = np.abs(a["delta"]) * 0.5
    wy, wh = _weights(a, seed=3)
    got = _grads(_fused(softplus), a, wy, wh, present)
    _assert_close(got, _grads(_autodiff(softplus), a, wy, wh, present))
    _assert_close(got, _grads(_reference(softplus), a, wy, wh, present))


def test_final_state_cotangent_alone():
    a = _args(21, 2, seed=4)
    _, wh = _weights(a)
    zero = jnp.zeros(a["u"].shape)
    _assert_close(_grads(_fused(), a, zero, wh), _grads(_reference(), a, zero, wh))


def test_output_cotangent_alone():
    a = _args(21, seed=5)
    wy, _ = _weights(a)
    _assert_close(_grads(_fused(), a, wy, None), _grads(_reference(), a, wy, None))


@pytest.mark.parametrize("T", [19, 40])
def test_backward_in_groups_of_chunks(T, monkeypatch):
    a = _args(T, 2, seed=6)
    wy, wh = _weights(a)
    whole = _grads(_fused(), a, wy, wh)
    Bt, Dc, N = a["h0"].shape
    # two chunks per group: the group count does not divide nc for T = 19 (3 chunks)
    monkeypatch.setattr(V, "GROUP_ELEMENTS", 2 * L * Bt * Dc * N)
    split = _grads(_fused(), a, wy, wh)
    _assert_close(split, whole)
    _assert_close(split, _grads(_reference(), a, wy, wh))


def test_jit_and_vmap_of_the_gradient():
    batches = [_args(11, seed=s) for s in range(3)]
    wy, wh = _weights(batches[0])
    stacked = {n: jnp.stack([jnp.asarray(b[n]) for b in batches]) for n in NAMES}

    def grad_u(*xs):
        return _grads(_fused(), dict(zip(NAMES, xs, strict=True)), wy, wh)["u"]

    got = jax.jit(jax.vmap(grad_u))(*stacked.values())
    for i, b in enumerate(batches):
        assert rel_err(got[i], _grads(_reference(), b, wy, wh)["u"]) <= GRAD_RTOL


def test_grad_of_grad_matches_autodiff():
    a = _args(10, seed=7)
    wy, wh = _weights(a)

    def outer(fn):
        def f(u, A):
            def inner(u, A):
                y, hT = fn(u, a["delta"], A, a["B"], a["C"], a["D"], a["z"],
                           a["delta_bias"], a["h0"])
                return jnp.sum(y * wy) + jnp.sum(hT * wh)
            gu, gA = jax.grad(inner, (0, 1))(u, A)
            return jnp.sum(gu ** 2) + jnp.sum(jnp.sin(gA))
        return jax.grad(f, (0, 1))(jnp.asarray(a["u"]), jnp.asarray(a["A"]))

    for g, w in zip(outer(_fused()), outer(_autodiff()), strict=True):
        assert rel_err(g, w) <= 1e-10


def test_float32_accumulates_in_float32_close_to_float64():
    a = _args(300, 2, seed=8, Dc=8, N=4)
    wy, wh = _weights(a)
    want = _grads(_reference(), a, wy, wh)
    a32 = {n: np.asarray(v, np.float32) for n, v in a.items()}
    got = _grads(_fused(chunk=None), a32, wy.astype(jnp.float32), wh.astype(jnp.float32))
    for n in NAMES:
        assert got[n].dtype == jnp.float32, n
        assert rel_err(got[n], want[n]) <= 1e-4, (n, rel_err(got[n], want[n]))


def _poisoned(a, name, t, value, channel=1):
    b = {n: v.copy() for n, v in a.items()}
    b[name][(0, channel) + (0,) * (b[name].ndim - 3) + (t,)] = value
    return b


@jax.jit
def _masked_grads(xs, wy):
    """Gradients of sum(y wy) in every argument, and y; wy is exactly zero from some t on."""
    def loss(*xs):
        y, _ = _fused()(*xs)
        return jnp.sum(y * wy), y
    grads, y = jax.grad(loss, tuple(range(len(NAMES))), has_aux=True)(*xs)
    return grads, y


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", PER_POSITION)
@pytest.mark.parametrize("t", [0, 7, 8, 18])
def test_gradients_of_outputs_before_a_non_finite_input_are_clean(name, t, value):
    """A loss on the outputs before t (weights exactly zero from t on); the input at t
    poisoned: every gradient (per position and summed over positions: A, D, delta_bias, h0)
    equals the clean run's, and is finite, as are the outputs before t."""
    a = _args(19, 2, seed=9)
    wy, _ = _weights(a, seed=10)
    wy = jnp.where(jnp.arange(19) < t, wy, 0.0)
    clean, y_clean = _masked_grads(tuple(jnp.asarray(a[n]) for n in NAMES), wy)
    bad = _poisoned(a, name, t, value)
    got, y = _masked_grads(tuple(jnp.asarray(bad[n]) for n in NAMES), wy)
    for n, g, c in zip(NAMES, got, clean, strict=True):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), (n, np.argwhere(~np.isfinite(g))[:4])
        assert rel_err(g, c) <= GRAD_RTOL, (n, rel_err(g, c))
    assert rel_err(y[..., :t], y_clean[..., :t]) <= GRAD_RTOL
    assert not np.array_equal(np.asarray(y), np.asarray(y_clean))  # the poison reached y
