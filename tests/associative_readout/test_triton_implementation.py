"""The torch backend's associative readout takes the Triton kernel or the torch path as told
(``MEMCORE_KERNELS``), with and without a capacity: same results as the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.associative_readout as readout_mod  # noqa: E402
from kcheck import assert_close  # noqa: E402
from primitives import REF as ops  # noqa: E402
from primitives import TORCH as api  # noqa: E402
from tritoncheck import F64, both_paths, take_path  # noqa: E402


@both_paths
def test_associative_readout_both_paths(mode, monkeypatch, device):
    calls = take_path(monkeypatch, mode, readout_mod, "associative_readout")
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(2, 9, 2, 5, generator=g, dtype=F64).to(device) for _ in range(2))
    for cap in (None, 3):
        assert_close("y", api.associative_readout(k, v, cap), ops.associative_readout(k, v, cap),
                     F64)
    assert calls == (["associative_readout"] * 2 if mode == "triton" else [])
