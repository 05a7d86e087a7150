"""The selective scan's fast paths against the reference scan in float64 (DESIGN 6: <= 1e-9):
chunk lengths that divide T (time viewed as chunks without a copy) and ones that pad, inputs
laid out as a linear layer gives them (transposed views), the fused softplus on both sides of
its threshold, and gradcheck of the whole wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from memcore.backends.torch import selective_scan as scan
from memcore.backends.torch import selective_scan as ssm_scan
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F32, F64, rel, rmse

NAMES = "u delta A B C D z bias h0".split()


def _args(seed, Bt, Dc, N, T, delta_shift=0.0, delta_scale=1.0, time_major=False):
    g = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    def bdt(*s):  # [Bt, Dc, T]; optionally a transposed view of [Bt, T, Dc] memory
        return rn(Bt, T, s[1]).transpose(1, 2) if time_major else rn(*s)

    A = -torch.rand(Dc, N, generator=g, dtype=torch.float64) * 2
    delta = bdt(Bt, Dc, T) * delta_scale + delta_shift
    return [rn(Bt, Dc, T), delta, A, rn(Bt, N, T), rn(Bt, N, T), rn(Dc), bdt(Bt, Dc, T),
            rn(Dc), rn(Bt, Dc, N)]


def _run(impl, args, weights):
    args = [a.detach().requires_grad_(True) for a in args]
    u, delta, A, B, C, D, z, bias, h0 = args
    y, h = impl.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                               return_final_state=True)
    loss = (y * weights[0]).sum() + (h * weights[1]).sum()
    return y, h, torch.autograd.grad(loss, args)


def _check(args, Bt, Dc, N, T):
    g = torch.Generator().manual_seed(99)
    weights = (torch.randn(Bt, Dc, T, generator=g, dtype=torch.float64),
               torch.randn(Bt, Dc, N, generator=g, dtype=torch.float64))
    y, h, grads = _run(O, args, weights)
    y_r, h_r, grads_r = _run(R, args, weights)
    assert rel(y, y_r) <= F64 and rel(h, h_r) <= F64
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert rel(a, b) <= F64, name


@pytest.mark.parametrize("T", [1, 2, 12, 36, 49, 53, 64])
def test_chunk_length_is_near_sqrt_and_divides_when_it_can(T):
    L = ssm_scan._chunk_len(T)
    root = math.isqrt(T - 1) + 1 if T > 1 else 1
    assert 1 <= L <= max(1, 2 * root) and L >= root // 2
    divisors = [d for d in range(max(1, root // 2), 2 * root + 1) if T % d == 0]
    if divisors:
        assert T % L == 0
        assert abs(L - root) == min(abs(d - root) for d in divisors)
    else:
        assert L == root


@pytest.mark.parametrize("T,time_major", [(36, True), (53, False), (64, True), (7, False)])
def test_divisor_and_padded_chunks_match_the_reference(T, time_major):
    # 36 and 64 split into whole chunks (views), 53 (prime) pads its last chunk.
    args = _args(T, 2, 5, 3, T, time_major=time_major)
    _check(args, 2, 5, 3, T)


@pytest.mark.parametrize("shift,scale", [(0.0, 25.0), (45.0, 1.0), (-45.0, 1.0)])
def test_softplus_across_its_threshold_matches_the_reference(shift, scale):
    # delta + bias spread over [-75, 75] (through the fused softplus' threshold), far above
    # it (it returns x) and far below it (exp underflows): all equal the reference's
    # log1p(exp(-|x|)) formula.
    args = _args(3, 1, 4, 2, 9, delta_shift=shift, delta_scale=scale)
    _check(args, 1, 4, 2, 9)


def test_decays_recomputed_when_not_kept(monkeypatch):
    monkeypatch.setattr(ssm_scan, "SAVE_ELEMENTS", 0)
    monkeypatch.setattr(ssm_scan, "SSM_GROUP_ELEMENTS", 40)
    args = _args(5, 2, 4, 3, 30, time_major=True)
    _check(args, 2, 4, 3, 30)


def test_wrapper_passes_gradcheck():
    args = _args(11, 1, 3, 2, 6, time_major=True)
    args = tuple(a.detach().requires_grad_(True) for a in args)

    def f(u, delta, A, B, C, D, z, bias, h0):
        return scan.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                   return_final_state=True)

    assert torch.autograd.gradcheck(f, args)


def test_float32_inputs_give_float32_outputs_close_to_float64():
    args = _args(8, 1, 6, 3, 40, time_major=True)
    y64, h64 = O.selective_scan(*args[:7], args[7], True, initial_state=args[8],
                                return_final_state=True)
    a32 = [a.float() for a in args]
    y32, h32 = O.selective_scan(*a32[:7], a32[7], True, initial_state=a32[8],
                                return_final_state=True)
    assert y32.dtype == torch.float32 and h32.dtype == torch.float32
    assert rmse(y32.double(), y64) <= F32 and rmse(h32.double(), h64) <= F32
