"""The O(T Dc N) selective scan (two-level loop, hand-written backward) against the reference
scan: values and every gradient, float64 within 1e-9 and float32 within relative RMSE 1e-5,
over chunk lengths that do not divide T, channel groups, backward groups and strong decays."""

from __future__ import annotations

import pytest
import torch
from memcore.backends.torch import selective_scan as ssm_scan
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F32, F64, rel, rmse

NAMES = "u delta A B C D z bias h0".split()


def _args(seed, Bt, Dc, N, T, groups, decay=2.0):
    g = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    shape = (Bt, groups, N, T) if groups else (Bt, N, T)
    A = -torch.rand(Dc, N, generator=g, dtype=torch.float64) * decay
    return [rn(Bt, Dc, T), rn(Bt, Dc, T), A, rn(*shape), rn(*shape), rn(Dc), rn(Bt, Dc, T),
            rn(Dc), rn(Bt, Dc, N)]


def _value_and_grads(impl, args, wy, wh, use_y=True, use_h=True):
    args = [a.detach().requires_grad_(True) for a in args]
    u, delta, A, B, C, D, z, bias, h0 = args
    y, h = impl.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                               return_final_state=True)
    loss = (y.double() * wy).sum() * use_y + (h.double() * wh).sum() * use_h
    return y, h, torch.autograd.grad(loss, args)


@pytest.mark.parametrize("T,groups,group_elements,save", [
    (2, 0, ssm_scan.SSM_GROUP_ELEMENTS, True), (10, 2, 1, True), (37, 0, 1, False),
    (64, 3, 50, True), (81, 1, 10**9, False)])
def test_float64_values_and_gradients(monkeypatch, T, groups, group_elements, save):
    # A small group bound splits the backward into several groups of chunks; without the
    # forward's decays the backward recomputes them.
    monkeypatch.setattr(ssm_scan, "SSM_GROUP_ELEMENTS", group_elements)
    monkeypatch.setattr(ssm_scan, "SAVE_ELEMENTS", ssm_scan.SAVE_ELEMENTS if save else 0)
    Dc = 6
    args = _args(T, 2, Dc, 3, T, groups)
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(2, Dc, T, generator=g, dtype=torch.float64)
    wh = torch.randn(2, Dc, 3, generator=g, dtype=torch.float64)
    y, h, grads = _value_and_grads(O, args, wy, wh)
    y_r, h_r, grads_r = _value_and_grads(R, args, wy, wh)
    assert rel(y, y_r) <= F64 and rel(h, h_r) <= F64
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert rel(a, b) <= F64, name


@pytest.mark.parametrize("use_y,use_h", [(True, False), (False, True)])
def test_gradients_through_one_output_only(use_y, use_h):
    args = _args(3, 1, 4, 2, 19, 0)
    wy, wh = torch.ones(1, 4, 19, dtype=torch.float64), torch.ones(1, 4, 2, dtype=torch.float64)
    *_, grads = _value_and_grads(O, args, wy, wh, use_y, use_h)
    *_, grads_r = _value_and_grads(R, args, wy, wh, use_y, use_h)
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert rel(a, b) <= F64, name


def test_strong_decays_stay_finite_and_exact():
    # exp(dt * A) underflows to 0 over a few steps: no overflow from a cumulative form.
    args = _args(5, 2, 4, 3, 50, 0, decay=400.0)
    wy = torch.ones(2, 4, 50, dtype=torch.float64)
    wh = torch.ones(2, 4, 3, dtype=torch.float64)
    y, h, grads = _value_and_grads(O, args, wy, wh)
    y_r, h_r, grads_r = _value_and_grads(R, args, wy, wh)
    assert torch.isfinite(y).all() and rel(y, y_r) <= F64 and rel(h, h_r) <= F64
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert torch.isfinite(a).all() and rel(a, b) <= F64, name


def test_float32_values_and_gradients():
    args = _args(7, 2, 8, 4, 300, 2)
    g = torch.Generator().manual_seed(2)
    wy = torch.randn(2, 8, 300, generator=g, dtype=torch.float64)
    wh = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    y, h, grads = _value_and_grads(O, [a.float() for a in args], wy, wh)
    y_r, h_r, grads_r = _value_and_grads(R, args, wy, wh)
    assert y.dtype == torch.float32
    assert rmse(y, y_r) <= F32 and rmse(h, h_r) <= F32
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert rmse(a, b) <= F32, name


def test_core_passes_gradcheck():
    g = torch.Generator().manual_seed(4)
    T, Bt, G, Dg, N = 11, 2, 2, 3, 2
    d = torch.float64
    inputs = (torch.rand(T, Bt, G, Dg, generator=g, dtype=d),
              torch.randn(T, Bt, G, Dg, generator=g, dtype=d),
              -torch.rand(G, Dg, N, generator=g, dtype=d),
              torch.randn(T, Bt, G, N, generator=g, dtype=d),
              torch.randn(T, Bt, G, N, generator=g, dtype=d),
              torch.randn(Bt, G, Dg, N, generator=g, dtype=d))
    inputs = tuple(a.requires_grad_(True) for a in inputs)
    assert torch.autograd.gradcheck(ssm_scan.selective_scan_core, inputs)
