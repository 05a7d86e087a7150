"""The reference persistent readout (DESIGN 2.6): ``memcore.ops`` on numpy arrays, a plain
softmax over the learned slots, and argument errors."""

from __future__ import annotations

import numpy as np
import plain
import pytest
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import persistent_readout as R
from refcheck import assert_close

from memcore import ops

seeds = st.integers(0, 2 ** 16)


def _rng(seed):
    return np.random.default_rng(seed)


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


def test_persistent_readout_argument_errors():
    with pytest.raises(ValueError, match=r"persistent_readout: mem_k and mem_v must be "
                                         r"\[H=2, P, E=4\]"):
        R.persistent_readout(np.zeros((1, 2, 4)), np.zeros((2, 5, 3)), np.zeros((2, 5, 3)))
