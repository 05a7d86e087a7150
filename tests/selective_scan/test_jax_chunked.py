"""The two-level chunked selective scan of ``memcore.backends.jax.selective_scan`` against the
associative form (``linear_recurrence`` then a contraction with C) and against the reference, in
float64 (<= 1e-9, DESIGN 6): lengths of one step, under one chunk, with a partial tail chunk and
of several whole chunks; an initial state; grouped B/C; and the hand-written gradients
against JAX autodiff of the associative form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcheck import F64_RTOL, rel_err
from memcore.backends.jax import selective_scan as S
from memcore.backends.jax.numerics import silu, softplus
from memcore.spec.reference import selective_scan as R

L = 8  # small chunk so that short sequences cover every layout
LENGTHS = {"one_step": 1, "under_one_chunk": 5, "partial_tail": 19, "whole_chunks": 24}


def _args(T, groups, seed=0):
    rng = np.random.default_rng(seed)
    Bt, Dc, N = 2, 4, 3
    r = rng.standard_normal
    shape = (Bt, N, T) if groups is None else (Bt, groups, N, T)
    return dict(u=r((Bt, Dc, T)), delta=r((Bt, Dc, T)), A=-np.exp(r((Dc, N))), B=r(shape),
                C=r(shape), D=r(Dc), z=r((Bt, Dc, T)), delta_bias=r(Dc), h0=r((Bt, Dc, N)))


def _core(a, chunk):
    j = {k: jnp.asarray(v) for k, v in a.items()}
    return S.scan_core(j["u"], j["delta"], j["A"], j["B"], j["C"], j["D"], j["z"],
                                 j["delta_bias"], True, j["h0"], chunk=chunk)


def _associative_core(u, delta, A, B, C, D, z, delta_bias, h0):
    """The former parallel form: associative scan, then contraction with C."""
    Dc = u.shape[1]
    dt = softplus(delta + delta_bias[None, :, None])
    B, C = S.expand_groups(B, Dc, 3), S.expand_groups(C, Dc, 3)
    hs, hT = S.linear_recurrence(dt[:, :, None, :] * A[None, :, :, None],
                                       (dt * u)[:, :, None, :] * B, h0)
    y = (jnp.sum(hs * C, axis=2) + D[None, :, None] * u) * silu(z)
    return y, hT


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("T", LENGTHS.values(), ids=LENGTHS.keys())
def test_chunked_scan_matches_associative_and_reference(T, groups):
    a = _args(T, groups)
    y, hT = _core(a, L)
    y0, h0T = _associative_core(**{k: jnp.asarray(v) for k, v in a.items()})
    want, wT = R.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                a["delta_bias"], delta_softplus=True, initial_state=a["h0"],
                                return_final_state=True)
    assert y.shape == want.shape and hT.shape == wT.shape
    assert rel_err(y, y0) <= F64_RTOL and rel_err(hT, h0T) <= F64_RTOL
    assert rel_err(y, want) <= F64_RTOL and rel_err(hT, wT) <= F64_RTOL


def test_chunk_length_does_not_change_the_result():
    a = _args(37, None, seed=1)
    y, hT = _core(a, None)  # the default length, from chunk_len
    for chunk in (1, 4, 16, 64):
        y2, hT2 = _core(a, chunk)
        assert rel_err(y2, y) <= F64_RTOL and rel_err(hT2, hT) <= F64_RTOL, chunk


def test_empty_sequence_keeps_the_state():
    a = _args(0, None)
    y, hT = _core(a, L)
    assert y.shape == (2, 4, 0)
    np.testing.assert_array_equal(np.asarray(hT), a["h0"])


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("T", [LENGTHS["under_one_chunk"], LENGTHS["partial_tail"]])
def test_chunked_scan_gradients_match_associative(T, groups):
    a = {k: jnp.asarray(v) for k, v in _args(T, groups, seed=2).items()}
    rng = np.random.default_rng(3)
    wy = jnp.asarray(rng.standard_normal(a["u"].shape))
    wh = jnp.asarray(rng.standard_normal(a["h0"].shape))
    names = tuple(a)

    def loss(fn):
        def f(*xs):
            y, hT = fn(**dict(zip(names, xs, strict=True)))
            return jnp.sum(y * wy) + jnp.sum(hT * wh)
        return f

    def chunked(u, delta, A, B, C, D, z, delta_bias, h0):
        return S.scan_core(u, delta, A, B, C, D, z, delta_bias, True, h0, chunk=L)

    argnums = tuple(range(len(names)))
    got = jax.grad(loss(chunked), argnums)(*a.values())
    want = jax.grad(loss(_associative_core), argnums)(*a.values())
    for name, g, w in zip(names, got, want, strict=True):
        assert rel_err(g, w) <= F64_RTOL, name


def test_chunk_len_tracks_sqrt_t_within_bounds():
    assert S.chunk_len(1) == S.MIN_CHUNK
    assert S.chunk_len(10**8) == S.MAX_CHUNK
    for T in (256, 1024, 4096):
        assert S.MIN_CHUNK <= S.chunk_len(T) <= S.MAX_CHUNK
        assert S.chunk_len(T) <= S.chunk_len(4 * T)
