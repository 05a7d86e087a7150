"""The torch backend's selective scan vs the reference's (same signature and states), float64
within 1e-9, gradients included."""

from __future__ import annotations

import pytest
import torch
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F32, F64, rel, rmse, scan_args

D64 = torch.float64


@pytest.mark.parametrize("T", [1, 15, 16, 17, 50])
@pytest.mark.parametrize("groups", [0, 1, 3])
def test_selective_scan(T, groups):
    g = torch.Generator().manual_seed(T + groups)
    u, delta, A, B, C, D, z, bias, h0 = scan_args(g, 2, 6, 3, T, groups)
    for kw in (dict(), dict(D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=h0)):
        y, h = O.selective_scan(u, delta, A, B, C, return_final_state=True, **kw)
        y_r, h_r = R.selective_scan(u, delta, A, B, C, return_final_state=True, **kw)
        assert rel(y, y_r) <= F64 and rel(h, h_r) <= F64
        assert h.dtype == D64
    # step form: each step equals the reference's step, and the fold equals the scan
    h, h_ref = h0, h0
    for t in range(T):
        a = (u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
        y_t, h = O.selective_state_update(h, *a)
        y_r, h_ref = R.selective_state_update(h_ref, *a)
        assert rel(y_t, y_r) <= F64 and rel(h, h_ref) <= F64
    y_full, h_full = R.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                      return_final_state=True)
    assert rel(y_t, y_full[..., -1]) <= F64 and rel(h, h_full) <= F64


def test_selective_scan_gradients_include_the_initial_state():
    g = torch.Generator().manual_seed(0)
    args = [a.requires_grad_(True) for a in scan_args(g, 2, 4, 3, 21, 2)]
    w = torch.randn(2, 4, 21, generator=g, dtype=D64)
    wh = torch.randn(2, 4, 3, generator=g, dtype=D64)
    grads = []
    for impl in (O, R):
        u, delta, A, B, C, D, z, bias, h0 = args
        y, h = impl.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                   return_final_state=True)
        grads.append(torch.autograd.grad((y * w).sum() + (h * wh).sum(), args))
    for name, a, b in zip("u delta A B C D z bias h0".split(), *grads, strict=True):
        assert rel(a, b) <= F64, name
    assert grads[0][-1].abs().sum() > 0


def test_selective_scan_float32():
    g = torch.Generator().manual_seed(1)
    args = scan_args(g, 2, 8, 4, 70, 0)
    u, delta, A, B, C, D, z, bias, h0 = (a.float() for a in args)
    y = O.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0)
    y_r = R.selective_scan(*args[:7], args[7], True, initial_state=args[8])
    assert y.dtype == torch.float32 and rmse(y, y_r) <= F32
