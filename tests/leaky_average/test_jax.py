"""``memcore.backends.jax.leaky_average`` vs the reference (float64, <= 1e-9), through
``memcore.ops``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxcheck import F64_RTOL, as_jax, normal_draws, rel_err
from memcore.spec.reference import leaky_average as R

import memcore.ops as O

_r = normal_draws(0)
_j = as_jax


def test_leaky_average_and_step():
    k, ld, h0 = _r(2, 9, 3, 2), -np.abs(_r(3)), _r(2, 3, 2)
    want, wT = R.leaky_average(k, ld, h0, return_final_state=True)
    got, gT = O.leaky_average(*_j(k, ld), jnp.asarray(h0), return_final_state=True)
    assert rel_err(got, want) <= F64_RTOL and rel_err(gT, wT) <= F64_RTOL
    want_t, ws = R.leaky_average_step(k[:, 0], ld, h0)
    got_t, gs = O.leaky_average_step(*_j(k[:, 0], ld, h0))
    assert rel_err(got_t, want_t) <= F64_RTOL and rel_err(gs, ws) <= F64_RTOL
