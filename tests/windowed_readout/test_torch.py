"""The torch backend's windowed readout vs the reference's (same signature and ring states),
float64 within 1e-9, in one call and split; the banded form never builds a T x T matrix."""

from __future__ import annotations

import pytest
import torch
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F64, rel

D64 = torch.float64


def _randn(g, *shape, dtype=D64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("window,fading", [(None, False), (1, False), (3, False), (8, False),
                                           (1, True), (3, True), (8, True)])
def test_windowed_readout_forms_and_splits(window, fading):
    g = torch.Generator().manual_seed(7)
    T = 13
    q, k, v, fk, fv = (_randn(g, 2, T, 2, 3) for _ in range(5))
    fa = dict(fading_k=fk, fading_v=fv) if fading else {}
    o, s = O.windowed_readout(q, k, v, window, return_final_state=True, **fa)
    o_r, s_r = R.windowed_readout(q, k, v, window, return_final_state=True, **fa)
    assert rel(o, o_r) <= F64
    assert s.keys() == s_r.keys() and s["pos"] == s_r["pos"]
    for key in s:
        if key != "pos":
            assert rel(s[key], s_r[key]) <= F64, key
    for a in (1, 5, 12):
        fa1 = dict(fading_k=fk[:, :a], fading_v=fv[:, :a]) if fading else {}
        fa2 = dict(fading_k=fk[:, a:], fading_v=fv[:, a:]) if fading else {}
        o1, s1 = O.windowed_readout(q[:, :a], k[:, :a], v[:, :a], window,
                                      return_final_state=True, **fa1)
        o2 = O.windowed_readout(q[:, a:], k[:, a:], v[:, a:], window, initial_state=s1, **fa2)
        assert rel(torch.cat([o1, o2], 1), o_r) <= F64
    st = O.windowed_readout_state(q, window, fading)
    for t in range(T):
        fs = dict(fading_k_t=fk[:, t], fading_v_t=fv[:, t]) if fading else {}
        o_t, st = O.windowed_readout_step(q[:, t], k[:, t], v[:, t], st, window, **fs)
        assert rel(o_t, o_r[:, t]) <= F64


def test_banded_attention_never_builds_a_t_by_t_matrix():
    from memcore.backends.torch.banded import _band_windows

    g = torch.Generator().manual_seed(0)
    T, W = 500, 3
    q, k = _randn(g, 1, 1, T, 2), _randn(g, 1, 1, T + W, 2)
    qb, kw, vw, mask = _band_windows(q, 0, [(k, k, -W, 0, W)], None)
    Q = qb.shape[3]
    assert Q < T and kw.shape[-2] == Q + W - 1 and mask.shape[-1] == Q + W - 1
