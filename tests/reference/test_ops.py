"""memcore.ops on numpy arrays runs the reference, and the streaming ops folded over time equal
the parallel ops (outputs and final states), including from an initial state."""

from __future__ import annotations

import math

import numpy as np
import plain
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import ops as R
from refcheck import assert_close, assert_states_equal, scan_cases

from memcore import ops

seeds = st.integers(0, 2 ** 16)


def _rng(seed):
    return np.random.default_rng(seed)


@given(case=scan_cases())
def test_selective_scan_op_numpy_is_reference_and_fold_of_update(case):
    args, opt, h0 = case
    y, hT = ops.selective_scan(*args, **opt, initial_state=h0, return_final_state=True)
    ry, rh = R.selective_scan(*args, **opt, initial_state=h0, return_final_state=True)
    assert np.array_equal(y, ry) and np.array_equal(hT, rh)
    u, delta, A, Bm, Cm = args
    Bt, Dc, T = u.shape
    h = np.zeros((Bt, Dc, A.shape[1])) if h0 is None else h0
    ys = []
    for t in range(T):
        step_opt = dict(opt, z=None if opt["z"] is None else opt["z"][..., t])
        y_t, h = ops.selective_state_update(h, u[..., t], delta[..., t], A, Bm[..., t],
                                            Cm[..., t], **step_opt)
        ys.append(y_t)
    assert_close(np.stack(ys, axis=-1), y, "y (fold of selective_state_update)")
    assert_close(h, hT, "final state (fold of selective_state_update)")


@given(B=st.integers(1, 2), T=st.integers(1, 20), H=st.integers(1, 3), E=st.integers(1, 4),
       seed=seeds, warm=st.booleans())
def test_leaky_average_op(B, T, H, E, seed, warm):
    r = _rng(seed)
    k = r.standard_normal((B, T, H, E))
    log_decay = -10 * np.abs(r.standard_normal(H) * 0.1)
    h0 = r.standard_normal((B, H, E)) if warm else None
    kbar, hT = ops.leaky_average(k, log_decay, initial_state=h0, return_final_state=True)
    rk, rh = R.leaky_average(k, log_decay, initial_state=h0, return_final_state=True)
    assert np.array_equal(kbar, rk) and np.array_equal(hT, rh)
    for b in range(B):
        for h in range(H):
            want = plain.leaky(k[b, :, h], math.exp(log_decay[h]),
                               None if h0 is None else h0[b, h])
            assert_close(kbar[b, :, h], want, "leaky_average vs loop")
    s = np.zeros((B, H, E)) if h0 is None else h0
    outs = []
    for t in range(T):
        o, s = ops.leaky_average_step(k[:, t], log_decay, s)
        outs.append(o)
    assert_close(np.stack(outs, axis=1), kbar, "fold of leaky_average_step")
    assert_close(s, hT, "final state (fold of leaky_average_step)")


@st.composite
def attention_cases(draw):
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 16))
    H, E = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    fading = draw(st.booleans())
    window = draw(st.integers(1, 6)) if fading else draw(st.one_of(st.none(),
                                                                   st.integers(1, 6)))
    r = _rng(draw(seeds))
    arrs = [r.standard_normal((B, T, H, E)) for _ in range(5 if fading else 3)]
    return arrs, window, fading


def _plain_windowed(arrs, window, fading):
    q, k, v = arrs[:3]
    B, T, H, E = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                raw = [j for j in range(t + 1) if window is None or j > t - window]
                keys = [k[b, j, h] for j in raw]
                vals = [v[b, j, h] for j in raw]
                if fading:
                    fad = [j for j in range(t + 1) if t - 2 * window < j <= t - window]
                    keys += [arrs[3][b, j, h] for j in fad]
                    vals += [arrs[4][b, j, h] for j in fad]
                out[b, t, h] = plain.softmax_readout(
                    [q[b, t, h] @ kk / math.sqrt(E) for kk in keys], np.array(vals))
    return out


@given(case=attention_cases(), data=st.data())
def test_windowed_attention_op(case, data):
    arrs, window, fading = case
    kw = dict(window=window)
    if fading:
        kw.update(fading_k=arrs[3], fading_v=arrs[4])
    o, state = ops.windowed_attention(*arrs[:3], **kw, return_final_state=True)
    ro, rstate = R.windowed_attention(*arrs[:3], **kw, return_final_state=True)
    assert np.array_equal(o, ro)
    assert_states_equal(state, rstate)
    assert_close(o, _plain_windowed(arrs, window, fading), "windowed_attention vs plain")

    # streaming form folded
    s = ops.windowed_attention_state(arrs[0], window, fading)
    outs = []
    T = arrs[0].shape[1]
    for t in range(T):
        kt = {} if not fading else dict(fading_k_t=arrs[3][:, t], fading_v_t=arrs[4][:, t])
        o_t, s = ops.windowed_attention_step(*(a[:, t] for a in arrs[:3]), s, window, **kt)
        outs.append(o_t)
    assert_close(np.stack(outs, axis=1), o, "fold of windowed_attention_step")
    assert_states_equal(s, state, "state (fold of windowed_attention_step)")

    # split in two calls through initial_state
    a = data.draw(st.integers(0, T), label="split")
    if 0 < a < T:
        first = [x[:, :a] for x in arrs]
        second = [x[:, a:] for x in arrs]

        def kws(parts):
            return dict(kw, fading_k=parts[3], fading_v=parts[4]) if fading else kw

        o1, s1 = ops.windowed_attention(*first[:3], **kws(first), return_final_state=True)
        o2, s2 = ops.windowed_attention(*second[:3], **kws(second), initial_state=s1,
                                        return_final_state=True)
        assert_close(np.concatenate([o1, o2], axis=1), o, f"split at {a}")
        assert_states_equal(s2, state, f"state (split at {a})")


@given(B=st.integers(1, 2), T=st.integers(1, 12), H=st.integers(1, 3), E=st.integers(1, 4),
       cap=st.one_of(st.none(), st.integers(1, 5)), seed=seeds)
def test_associative_readout_op(B, T, H, E, cap, seed):
    r = _rng(seed)
    k, v = r.standard_normal((B, T, H, E)), r.standard_normal((B, T, H, E))
    assert np.array_equal(ops.associative_readout(k, v, capacity=cap),
                          R.associative_readout(k, v, capacity=cap))


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), H=st.integers(1, 3),
       E=st.integers(1, 4), P=st.integers(1, 5), seed=seeds)
def test_persistent_readout_op(lead, H, E, P, seed):
    r = _rng(seed)
    k = r.standard_normal(tuple(lead) + (H, E))
    mk, mv = r.standard_normal((H, P, E)), r.standard_normal((H, P, E))
    got = ops.persistent_readout(k, mk, mv)
    assert np.array_equal(got, R.persistent_readout(k, mk, mv))
    flat_k, flat_g = k.reshape(-1, H, E), got.reshape(-1, H, E)
    for i in range(flat_k.shape[0]):
        for h in range(H):
            assert_close(flat_g[i, h], plain.softmax_readout(mk[h] @ flat_k[i, h], mv[h]),
                         "persistent_readout vs plain")


@given(B=st.integers(1, 2), T=st.integers(1, 8), D=st.integers(1, 6), seed=seeds,
       pred=st.booleans())
def test_innovation_scores_op(B, T, D, seed, pred):
    r = _rng(seed)
    x, s_prev = r.standard_normal((B, T, D)), r.standard_normal((B, T, D))
    W = r.standard_normal((D, D)) if pred else None
    got = ops.innovation_scores(x, s_prev if pred else None, W)
    assert np.array_equal(got, R.innovation_scores(x, s_prev if pred else None, W))
    xhat = s_prev @ W.T if pred else 0.0
    assert_close(got, np.mean((x - xhat) ** 2, axis=-1), "innovation scores vs formula")


def test_store_ops_are_the_reference():
    r = _rng(0)
    a = {"k": r.standard_normal((1, 2, 4, 3)), "v": r.standard_normal((1, 2, 4, 3)),
         "score": np.array([[1.0, 2.0, 1.0, 0.0]]), "pos": np.array([[3, 5, 7, -1]])}
    b = {"k": r.standard_normal((1, 2, 2, 3)), "v": r.standard_normal((1, 2, 2, 3)),
         "score": np.array([[2.0, 1.0]]), "pos": np.array([[9, 8]])}
    top = ops.store_top(a, 3)
    assert top["pos"].tolist() == [[5, 7, 3]]
    assert np.array_equal(top["k"][:, :, 0], a["k"][:, :, 1])
    merged = ops.store_merge(a, b, 4)
    assert merged["pos"].tolist() == [[9, 5, 8, 7]]
    assert merged["score"].tolist() == [[2.0, 2.0, 1.0, 1.0]]
    assert np.array_equal(merged["v"][:, :, 2], b["v"][:, :, 1])
    assert ops.store_top(a, 5)["pos"].tolist() == [[5, 7, 3, -1, -1]]


def test_ops_dispatch_numpy_to_the_reference():
    assert ops._impl("selective_scan", "numpy") is R.selective_scan
    for name in R.__all__:
        assert getattr(ops, name).__doc__ == getattr(R, name).__doc__
