"""The mamba block's time-first causal convolution against torch's conv1d (the layout the
reference uses): values and gradients in float64 (DESIGN 6: <= 1e-9), every kernel width,
calls shorter than the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from memcore.backends.torch.layers.mamba import causal_conv as _causal_conv
from torchcheck import F64, rel


@pytest.mark.parametrize("K,T", [(1, 5), (2, 1), (3, 7), (4, 2), (4, 30)])
def test_matches_conv1d_with_gradients(K, T):
    g = torch.Generator().manual_seed(K * 100 + T)
    B, Di = 2, 5
    xcat = torch.randn(B, K - 1 + T, Di, generator=g, dtype=torch.float64)
    w = torch.randn(Di, 1, K, generator=g, dtype=torch.float64)
    b = torch.randn(Di, generator=g, dtype=torch.float64)
    weight = torch.randn(B, T, Di, generator=g, dtype=torch.float64)

    def grads(fn):
        args = [a.detach().requires_grad_(True) for a in (xcat, w, b)]
        y = fn(*args)
        return y, torch.autograd.grad((y * weight).sum(), args)

    y, gs = grads(lambda x, w, b: _causal_conv(x, w, b, T))
    y_r, gs_r = grads(lambda x, w, b: F.conv1d(x.transpose(1, 2), w, b, groups=Di)
                      .transpose(1, 2))
    assert y.shape == (B, T, Di) and rel(y, y_r) <= F64
    for name, a, r in zip(("x", "weight", "bias"), gs, gs_r, strict=True):
        assert rel(a, r) <= F64, name
