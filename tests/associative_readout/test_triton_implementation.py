"""The torch backend's primitive functions choose between the Triton kernels and the torch path
(``implementation=``, ``MEMCORE_KERNELS``): same results and states as the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.associative_readout as readout_mod  # noqa: E402
from kcheck import assert_close  # noqa: E402
from memcore.backends.torch import implementation  # noqa: E402
from primitives import REF as ops  # noqa: E402
from primitives import TORCH as api  # noqa: E402

F64 = torch.float64


def spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapped(*a, **kw):
        calls.append(name)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_associative_readout_both_paths(mode, monkeypatch, device):
    monkeypatch.setenv(implementation.ENV, mode)
    calls = spy(monkeypatch, readout_mod, "associative_readout")
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(2, 9, 2, 5, generator=g, dtype=F64).to(device) for _ in range(2))
    for cap in (None, 3):
        assert_close("y", api.associative_readout(k, v, cap), ops.associative_readout(k, v, cap),
                     F64)
    assert calls == (["associative_readout"] * 2 if mode == "triton" else [])
