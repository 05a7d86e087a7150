"""The torch backend's leaky average takes the Triton kernel or the torch path as told
(``MEMCORE_KERNELS``): same outputs and final state as the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.leaky_average as leaky_mod  # noqa: E402
from kcheck import assert_close  # noqa: E402
from primitives import REF as ops  # noqa: E402
from primitives import TORCH as api  # noqa: E402
from tritoncheck import F64, both_paths, take_path  # noqa: E402


@both_paths
def test_leaky_average_both_paths(mode, monkeypatch, device):
    calls = take_path(monkeypatch, mode, leaky_mod, "leaky_average")
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 7, 3, 5, generator=g, dtype=F64)
    ld = -torch.rand(3, generator=g, dtype=F64)
    h0 = torch.randn(2, 3, 5, generator=g, dtype=F64)
    k, ld, h0 = k.to(device), ld.to(device), h0.to(device)
    y, h = api.leaky_average(k, ld, h0, return_final_state=True)
    yr, hr = ops.leaky_average(k, ld, h0, return_final_state=True)
    assert calls == (["leaky_average"] if mode == "triton" else [])
    assert_close("kbar", y, yr, F64)
    assert_close("h", h, hr, F64)
