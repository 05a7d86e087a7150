"""The reference associative readout (DESIGN 2.5): ``memcore.ops`` on numpy arrays, a plain
softmax over the past pairs, and argument errors."""

from __future__ import annotations

import numpy as np
import plain
import pytest
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import associative_readout as R
from refcheck import assert_close, mosaic_specs

from memcore import ops

seeds = st.integers(0, 2 ** 16)


def _rng(seed):
    return np.random.default_rng(seed)


@given(B=st.integers(1, 2), T=st.integers(1, 12), H=st.integers(1, 3), E=st.integers(1, 4),
       cap=st.one_of(st.none(), st.integers(1, 5)), seed=seeds)
def test_associative_readout_op(B, T, H, E, cap, seed):
    r = _rng(seed)
    k, v = r.standard_normal((B, T, H, E)), r.standard_normal((B, T, H, E))
    assert np.array_equal(ops.associative_readout(k, v, capacity=cap),
                          R.associative_readout(k, v, capacity=cap))


@given(spec=mosaic_specs(), T=st.integers(2, 10), seed=seeds)
def test_associative_readout_op_matches_the_mosaic_layer_core(spec, T, seed):
    """ops.associative_readout on keys/values built by hand equals the plain softmax."""
    rng = np.random.default_rng(seed)
    H, E = spec.n_heads, spec.head_dim
    k = rng.standard_normal((1, T, H, E))
    v = rng.standard_normal((1, T, H, E))
    got = R.associative_readout(k, v, capacity=spec.capacity)
    want = np.zeros_like(k)
    for h in range(H):
        for t in range(1, T):
            js = [j for j in range(t) if spec.capacity is None or j >= t - spec.capacity]
            want[0, t, h] = plain.softmax_readout([k[0, t, h] @ k[0, j, h] for j in js],
                                                  v[0, js, h])
    assert_close(got, want, "associative_readout vs plain")


def test_associative_readout_argument_errors():
    with pytest.raises(ValueError, match=r"associative_readout: k and v must be"):
        R.associative_readout(np.zeros((1, 3, 2, 4)), np.zeros((1, 3, 2, 3)))
