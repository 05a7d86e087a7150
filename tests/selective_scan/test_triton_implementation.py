"""The torch backend's selective scan takes the Triton kernel or the torch path as told
(``MEMCORE_KERNELS``): same outputs and final state as the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.selective_scan as scan_mod  # noqa: E402
from kcheck import assert_close  # noqa: E402
from primitives import REF as ops  # noqa: E402
from primitives import TORCH as api  # noqa: E402
from tritoncheck import F64, both_paths, take_path  # noqa: E402


def scan_args(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bt, Dc, T, N = 2, 4, 9, 3
    args = dict(u=torch.randn(Bt, Dc, T, generator=g, dtype=F64),
                delta=torch.randn(Bt, Dc, T, generator=g, dtype=F64),
                A=-torch.rand(Dc, N, generator=g, dtype=F64),
                B=torch.randn(Bt, N, T, generator=g, dtype=F64),
                C=torch.randn(Bt, N, T, generator=g, dtype=F64),
                D=torch.randn(Dc, generator=g, dtype=F64),
                initial_state=torch.randn(Bt, Dc, N, generator=g, dtype=F64))
    return {k: v.to(device) for k, v in args.items()}


@both_paths
def test_selective_scan_both_paths(mode, monkeypatch, device):
    calls = take_path(monkeypatch, mode, scan_mod, "selective_scan")
    args = scan_args(device)
    y, h = api.selective_scan(**args, delta_softplus=True, return_final_state=True)
    yr, hr = ops.selective_scan(**args, delta_softplus=True, return_final_state=True)
    assert calls == (["selective_scan"] if mode == "triton" else [])
    assert_close("y", y, yr, F64)
    assert_close("h", h, hr, F64)
