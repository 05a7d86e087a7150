"""The reference windowed readout (DESIGN 2.3): the op against a plain softmax over the raw and
fading windows, its streaming form and split calls, the rotary convention, and argument errors."""

from __future__ import annotations

import math

import numpy as np
import plain
import pytest
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import windowed_readout as R
from refcheck import assert_close, assert_states_equal

from memcore import ops

seeds = st.integers(0, 2 ** 16)


def _rng(seed):
    return np.random.default_rng(seed)


@st.composite
def readout_cases(draw):
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


@given(case=readout_cases(), data=st.data())
def test_windowed_readout_op(case, data):
    arrs, window, fading = case
    kw = dict(window=window)
    if fading:
        kw.update(fading_k=arrs[3], fading_v=arrs[4])
    o, state = ops.windowed_readout(*arrs[:3], **kw, return_final_state=True)
    ro, rstate = R.windowed_readout(*arrs[:3], **kw, return_final_state=True)
    assert np.array_equal(o, ro)
    assert_states_equal(state, rstate)
    assert_close(o, _plain_windowed(arrs, window, fading), "windowed_readout vs plain")

    # streaming form folded
    s = ops.windowed_readout_state(arrs[0], window, fading)
    outs = []
    T = arrs[0].shape[1]
    for t in range(T):
        kt = {} if not fading else dict(fading_k_t=arrs[3][:, t], fading_v_t=arrs[4][:, t])
        o_t, s = ops.windowed_readout_step(*(a[:, t] for a in arrs[:3]), s, window, **kt)
        outs.append(o_t)
    assert_close(np.stack(outs, axis=1), o, "fold of windowed_readout_step")
    assert_states_equal(s, state, "state (fold of windowed_readout_step)")

    # split in two calls through initial_state
    a = data.draw(st.integers(0, T), label="split")
    if 0 < a < T:
        first = [x[:, :a] for x in arrs]
        second = [x[:, a:] for x in arrs]

        def kws(parts):
            return dict(kw, fading_k=parts[3], fading_v=parts[4]) if fading else kw

        o1, s1 = ops.windowed_readout(*first[:3], **kws(first), return_final_state=True)
        o2, s2 = ops.windowed_readout(*second[:3], **kws(second), initial_state=s1,
                                        return_final_state=True)
        assert_close(np.concatenate([o1, o2], axis=1), o, f"split at {a}")
        assert_states_equal(s2, state, f"state (split at {a})")


def test_rope_convention_by_hand():
    """One coordinate pair rotated by hand: pairs (i, i + E//2), angle p * 10000^(-2i/(2*(E//2))),
    and an odd last coordinate left alone."""
    from memcore.spec.reference.rotary import rope

    v = np.arange(1.0, 6.0)  # E = 5: pairs (0, 2), (1, 3); coordinate 4 stays
    p = 3
    got = rope(np, v[None, None, None, :], np.array([p]))[0, 0, 0]
    t0, t1 = p * 1.0, p * 10000.0 ** -0.5
    want = np.array([
        v[0] * np.cos(t0) - v[2] * np.sin(t0),
        v[1] * np.cos(t1) - v[3] * np.sin(t1),
        v[2] * np.cos(t0) + v[0] * np.sin(t0),
        v[3] * np.cos(t1) + v[1] * np.sin(t1),
        v[4],
    ])
    assert_close(got, want, "rope of one vector")
    assert_close(got, plain.rope_vec(v, p), "rope vs the test's rope")


def test_windowed_readout_argument_errors():
    q = np.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"windowed_readout: k must have q's shape"):
        R.windowed_readout(q, np.zeros((1, 3, 2, 3)), q)
    with pytest.raises(ValueError, match=r"give both fading_k and fading_v"):
        R.windowed_readout(q, q, q, window=2, fading_k=q)
    with pytest.raises(ValueError, match=r"window must be an int when fading keys are given"):
        R.windowed_readout(q, q, q, fading_k=q, fading_v=q)
