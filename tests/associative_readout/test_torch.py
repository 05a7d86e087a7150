"""The torch backend's associative readout vs the reference's, float64 within 1e-9."""

from __future__ import annotations

import pytest
import torch
from primitives import REF as R
from primitives import TORCH as O
from torch.profiler import profile
from torchcheck import F64, rel

import memcore

D64 = torch.float64


def _randn(g, *shape, dtype=D64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("capacity", [None, 1, 2, 5, 40])
@pytest.mark.parametrize("T", [1, 2, 17])
def test_associative_readout(capacity, T):
    g = torch.Generator().manual_seed(T)
    k = _randn(g, 2, T, 3, 3).requires_grad_(True)
    v = _randn(g, 2, T, 3, 3).requires_grad_(True)
    y = O.associative_readout(k, v, capacity)
    y_r = R.associative_readout(k, v, capacity)
    assert rel(y, y_r) <= F64
    assert not y[:, 0].abs().any()  # the first position has no past
    w = torch.randn(y.shape, generator=g, dtype=D64)
    # T = 1 reads nothing: unused inputs then have a zero gradient.
    ga = torch.autograd.grad((y * w).sum(), (k, v), allow_unused=True, materialize_grads=True)
    gb = torch.autograd.grad((y_r * w).sum(), (k, v), allow_unused=True, materialize_grads=True)
    for a, b in zip(ga, gb, strict=True):
        assert torch.isfinite(a).all() and rel(a, b) <= F64


def test_mosaic_readout_takes_the_fused_cpu_kernel():
    """The mosaic layer's leaky keys come out with time innermost; the readout must still reach
    torch's fused CPU attention (forward and backward), not its math path, which materialises
    the scores and made RegBench's mosaic training several times slower."""
    spec = memcore.spec.mosaic(32, 2)
    layer = memcore.realize(spec, backend="torch", params=memcore.init(spec, 0))
    x = torch.randn(2, 33, 32, requires_grad=True)
    with profile() as prof:
        y, _ = layer(x)
        y.pow(2).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert "aten::_scaled_dot_product_attention_math" not in names
