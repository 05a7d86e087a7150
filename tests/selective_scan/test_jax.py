"""``memcore.backends.jax.selective_scan`` vs the reference (float64, <= 1e-9), through
``memcore.ops`` so the routing to this backend is exercised too."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jaxcheck import F64_RTOL, as_jax, normal_draws, rel_err
from memcore.spec.reference import selective_scan as R

import memcore.ops as O

_r = normal_draws(0)
_j = as_jax


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
