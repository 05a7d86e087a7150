"""The torch backend's leaky average vs the reference's, float64 within 1e-9."""

from __future__ import annotations

import pytest
import torch
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F64, rel

D64 = torch.float64


def _randn(g, *shape, dtype=D64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("T", [1, 7, 33])
def test_leaky_average(T):
    g = torch.Generator().manual_seed(T)
    k = _randn(g, 2, T, 3, 5).requires_grad_(True)
    decay = (-torch.rand(3, generator=g, dtype=D64) * 3).requires_grad_(True)
    h0 = _randn(g, 2, 3, 5).requires_grad_(True)
    y, h = O.leaky_average(k, decay, h0, return_final_state=True)
    y_r, h_r = R.leaky_average(k, decay, h0, return_final_state=True)
    assert rel(y, y_r) <= F64 and rel(h, h_r) <= F64
    ga = torch.autograd.grad(y.sum() + h.sum(), (k, decay, h0))
    gb = torch.autograd.grad(y_r.sum() + h_r.sum(), (k, decay, h0))
    for a, b in zip(ga, gb, strict=True):
        assert rel(a, b) <= F64
    s = h0
    for t in range(T):
        y_t, s = O.leaky_average_step(k[:, t], decay, s)
        assert rel(y_t, y_r[:, t]) <= F64
