"""``memcore.backends.jax.persistent_readout`` vs the reference (float64, <= 1e-9), through
``memcore.ops``."""

from __future__ import annotations

from jaxcheck import F64_RTOL, as_jax, normal_draws, rel_err
from memcore.spec.reference import persistent_readout as R

import memcore.ops as O

_r = normal_draws(0)


def test_persistent_readout():
    k, mk, mv = _r(2, 5, 2, 3), _r(2, 4, 3), _r(2, 4, 3)
    got = O.persistent_readout(*as_jax(k, mk, mv))
    assert rel_err(got, R.persistent_readout(k, mk, mv)) <= F64_RTOL
