"""``memcore.backends.jax.ops`` vs the reference ops (float64, <= 1e-9), through
``memcore.ops`` so the dispatch to this backend is exercised too."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jaxcheck import F64_RTOL, rel_err
from memcore.backends.jax import ops as J
from memcore.spec.reference import ops as R

import memcore.ops as O

RNG = np.random.default_rng(0)


def _r(*shape):
    return RNG.standard_normal(shape)


def _j(*arrays):
    return [None if a is None else jnp.asarray(a) for a in arrays]


def test_memcore_ops_routes_jax_arrays_here():
    for name in R.__all__:
        assert O._impl(name, O._library((jnp.zeros(1),), {})) is getattr(J, name), name


@pytest.mark.parametrize("groups", [None, 2])
def test_selective_scan_and_step(groups):
    Bt, Dc, N, T = 2, 4, 3, 7
    u, delta, z = _r(Bt, Dc, T), _r(Bt, Dc, T), _r(Bt, Dc, T)
    A = -np.exp(_r(Dc, N))
    shape = (Bt, N, T) if groups is None else (Bt, groups, N, T)
    B, C = _r(*shape), _r(*shape)
    D, bias, h0 = _r(Dc), _r(Dc), _r(Bt, Dc, N)
    args = (u, delta, A, B, C, D, z, bias)
    want, hT = R.selective_scan(*args, delta_softplus=True, initial_state=h0,
                                return_final_state=True)
    got, gT = O.selective_scan(*_j(*args), delta_softplus=True, initial_state=jnp.asarray(h0),
                               return_final_state=True)
    assert rel_err(got, want) <= F64_RTOL and rel_err(gT, hT) <= F64_RTOL
    step = (u[..., 0], delta[..., 0], A, B[..., 0], C[..., 0], D, z[..., 0], bias)
    want_t, wh = R.selective_state_update(h0, *step, delta_softplus=True)
    got_t, gh = O.selective_state_update(*_j(h0, *step), delta_softplus=True)
    assert rel_err(got_t, want_t) <= F64_RTOL and rel_err(gh, wh) <= F64_RTOL


def test_leaky_average_and_step():
    k, ld, h0 = _r(2, 9, 3, 2), -np.abs(_r(3)), _r(2, 3, 2)
    want, wT = R.leaky_average(k, ld, h0, return_final_state=True)
    got, gT = O.leaky_average(*_j(k, ld), jnp.asarray(h0), return_final_state=True)
    assert rel_err(got, want) <= F64_RTOL and rel_err(gT, wT) <= F64_RTOL
    want_t, ws = R.leaky_average_step(k[:, 0], ld, h0)
    got_t, gs = O.leaky_average_step(*_j(k[:, 0], ld, h0))
    assert rel_err(got_t, want_t) <= F64_RTOL and rel_err(gs, ws) <= F64_RTOL


@pytest.mark.parametrize("window,fading", [(None, False), (3, False), (2, True)])
def test_windowed_attention_split_and_step(window, fading):
    B, T, H, E = 2, 7, 2, 3
    q, k, v, fk, fv = (_r(B, T, H, E) for _ in range(5))
    fk, fv = (fk, fv) if fading else (None, None)
    want, ws = R.windowed_attention(q, k, v, window, fk, fv, return_final_state=True)
    a = 4
    cut = (lambda x, s: None if x is None else x[:, s])  # noqa: E731
    g1, st = O.windowed_attention(*_j(q[:, :a], k[:, :a], v[:, :a]), window,
                                  *_j(cut(fk, slice(0, a)), cut(fv, slice(0, a))),
                                  return_final_state=True)
    g2, st = O.windowed_attention(*_j(q[:, a:], k[:, a:], v[:, a:]), window,
                                  *_j(cut(fk, slice(a, T)), cut(fv, slice(a, T))),
                                  initial_state=st, return_final_state=True)
    assert rel_err(jnp.concatenate([g1, g2], axis=1), want) <= F64_RTOL
    for key in ws:
        if key != "pos":
            assert rel_err(st[key], ws[key]) <= F64_RTOL, key
    assert int(st["pos"]) == T
    # Streaming form continues both states alike.
    qt, kt, vt = _r(B, H, E), _r(B, H, E), _r(B, H, E)
    ft = (_r(B, H, E), _r(B, H, E)) if fading else (None, None)
    want_t, _ = R.windowed_attention_step(qt, kt, vt, ws, window, *ft)
    got_t, _ = O.windowed_attention_step(*_j(qt, kt, vt), st, window, *_j(*ft))
    assert rel_err(got_t, want_t) <= F64_RTOL


@pytest.mark.parametrize("capacity", [None, 1, 3])
def test_associative_readout(capacity):
    k, v = _r(2, 8, 2, 3), _r(2, 8, 2, 3)
    got = O.associative_readout(*_j(k, v), capacity=capacity)
    assert rel_err(got, R.associative_readout(k, v, capacity)) <= F64_RTOL
    assert np.all(np.asarray(got[:, 0]) == 0)  # the first row reads nothing


def test_persistent_readout_store_merge_and_scores():
    k, mk, mv = _r(2, 5, 2, 3), _r(2, 4, 3), _r(2, 4, 3)
    assert rel_err(O.persistent_readout(*_j(k, mk, mv)), R.persistent_readout(k, mk, mv)) \
        <= F64_RTOL

    def entries(pos):
        n = len(pos)
        return {"k": _r(1, 2, n, 3), "v": _r(1, 2, n, 3), "score": np.round(_r(1, n)),
                "pos": np.array([pos], dtype=np.int64)}

    a, b = entries([3, -1, 7]), entries([1, 5])
    want = R.store_merge(a, b, 3)
    got = O.store_merge({f: jnp.asarray(x) for f, x in a.items()},
                        {f: jnp.asarray(x) for f, x in b.items()}, 3)
    for f in want:
        np.testing.assert_array_equal(np.asarray(got[f]), want[f])
    x, s, w = _r(2, 4, 3), _r(2, 4, 3), _r(3, 3)
    assert rel_err(O.innovation_scores(*_j(x, s, w)), R.innovation_scores(x, s, w)) <= F64_RTOL
