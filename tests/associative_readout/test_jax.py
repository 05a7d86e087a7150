"""``memcore.backends.jax.associative_readout`` vs the reference (float64, <= 1e-9), through
``memcore.ops``."""

from __future__ import annotations

import numpy as np
import pytest
from jaxcheck import F64_RTOL, as_jax, normal_draws, rel_err
from memcore.spec.reference import associative_readout as R

import memcore.ops as O

_r = normal_draws(0)
_j = as_jax


@pytest.mark.parametrize("capacity", [None, 1, 3])
def test_associative_readout(capacity):
    k, v = _r(2, 8, 2, 3), _r(2, 8, 2, 3)
    got = O.associative_readout(*_j(k, v), capacity=capacity)
    assert rel_err(got, R.associative_readout(k, v, capacity)) <= F64_RTOL
    assert np.all(np.asarray(got[:, 0]) == 0)  # the first row reads nothing
