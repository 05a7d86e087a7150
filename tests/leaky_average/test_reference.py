"""The reference leaky average (DESIGN 2.2): a plain loop, the streaming form folded over time,
``memcore.ops`` on numpy arrays, and argument errors."""

from __future__ import annotations

import math

import numpy as np
import plain
import pytest
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import leaky_average as R
from refcheck import assert_close

from memcore import ops

seeds = st.integers(0, 2 ** 16)


def _rng(seed):
    return np.random.default_rng(seed)


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


def test_leaky_average_argument_errors():
    with pytest.raises(ValueError, match=r"leaky_average: log_decay must be \[heads=2\]"):
        R.leaky_average(np.zeros((1, 3, 2, 4)), np.zeros(3))
    with pytest.raises(ValueError, match=r"leaky_average: k must be \[batch, T, heads, "
                                         r"head_dim\]"):
        R.leaky_average(np.zeros((3, 2, 4)), np.zeros(2))
