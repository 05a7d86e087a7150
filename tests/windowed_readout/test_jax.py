"""``memcore.backends.jax.windowed_readout`` vs the reference (float64, <= 1e-9), through
``memcore.ops``: split calls, states and the streaming form."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jaxcheck import F64_RTOL, as_jax, normal_draws, rel_err
from memcore.spec.reference import windowed_readout as R

import memcore.ops as O

_r = normal_draws(0)
_j = as_jax


@pytest.mark.parametrize("window,fading", [(None, False), (3, False), (2, True)])
def test_windowed_readout_split_and_step(window, fading):
    B, T, H, E = 2, 7, 2, 3
    q, k, v, fk, fv = (_r(B, T, H, E) for _ in range(5))
    fk, fv = (fk, fv) if fading else (None, None)
    want, ws = R.windowed_readout(q, k, v, window, fk, fv, return_final_state=True)
    a = 4
    cut = (lambda x, s: None if x is None else x[:, s])  # noqa: E731
    g1, st = O.windowed_readout(*_j(q[:, :a], k[:, :a], v[:, :a]), window,
                                  *_j(cut(fk, slice(0, a)), cut(fv, slice(0, a))),
                                  return_final_state=True)
    g2, st = O.windowed_readout(*_j(q[:, a:], k[:, a:], v[:, a:]), window,
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
    want_t, _ = R.windowed_readout_step(qt, kt, vt, ws, window, *ft)
    got_t, _ = O.windowed_readout_step(*_j(qt, kt, vt), st, window, *_j(*ft))
    assert rel_err(got_t, want_t) <= F64_RTOL
