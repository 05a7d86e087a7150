"""Triton associative readout against the reference
(``memcore.spec.reference.associative_readout``): forward and autograd gradients to k (query
and key at once) and v, on shapes off the tile grid, with and without a capacity."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from kcheck import assert_close, assert_grads_close, gpu  # noqa: E402
from memcore.kernels.triton.associative_readout import (  # noqa: E402
    associative_readout,
    associative_readout_ref,
)
from memcore.spec.reference.associative_readout import associative_readout as spec_readout  # noqa: E402


def make(B, T, H, E, dtype, device, seed=0, key_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, E, generator=g, dtype=torch.float64) * key_scale
    v = torch.randn(B, T, H, E, generator=g, dtype=torch.float64)
    return {"k": k.to(device=device, dtype=dtype).requires_grad_(),
            "v": v.to(device=device, dtype=dtype).requires_grad_()}


def check(inp, capacity, dtype, seed=1):
    y = associative_readout(**inp, capacity=capacity)
    want = spec_readout(**inp, capacity=capacity)
    assert y.dtype == inp["k"].dtype
    assert_close("y", y, want, dtype)
    # the first row reads nothing
    assert float(y[:, 0].detach().abs().max()) == 0.0
    assert_grads_close((y,), (want,), inp, dtype, seed)


# (B, T, H, E, capacity): T = 1, T off the 16-row tile and over several tiles, odd head widths,
# capacity 1, capacity 0 (reads nothing), capacity > T, a band narrower than a tile that
# crosses tile edges, and no capacity. Capacity 2 makes the last query a key tile reaches
# (j + M) start a query tile of its own, so a short loop bound there shows.
SHAPES = [(1, 1, 2, 4, None), (2, 21, 2, 5, None), (1, 37, 1, 3, 1), (1, 9, 2, 7, 0),
          (1, 19, 1, 6, 50), (2, 40, 1, 17, 5), (1, 40, 1, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}E{}M{}".format(*s))
def test_float64(shape, device):
    B, T, H, E, M = shape
    check(make(B, T, H, E, torch.float64, device), M, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("capacity", [None, 3])
def test_low_precision(dtype, capacity, device):
    # keys of norm ~1 keep the unscaled scores in the range where bf16 rounding of the
    # probabilities stays inside the tolerance
    check(make(2, 18, 2, 6, dtype, device, seed=4, key_scale=0.4), capacity, dtype)


def test_large_scores_stay_finite(device):
    """Unscaled dot products of long keys are large; the online softmax must not overflow."""
    check(make(1, 20, 1, 8, torch.float64, device, seed=5, key_scale=6.0), None, torch.float64)


def test_dense_ref_matches_spec():
    for M in (None, 2):
        inp = make(2, 11, 2, 3, torch.float64, "cpu", seed=6)
        assert_close("y", associative_readout_ref(**inp, capacity=M),
                     spec_readout(**inp, capacity=M), torch.float64)


def test_bad_input_names_the_argument():
    k = torch.zeros(1, 3, 2, 4)
    with pytest.raises(ValueError, match="v must have k's shape"):
        associative_readout(k, torch.zeros(1, 3, 2, 5))
    with pytest.raises(ValueError, match="k must be"):
        associative_readout(k[0], k[0])
    with pytest.raises(ValueError, match="capacity must be"):
        associative_readout(k, k, capacity=-1)
    with pytest.raises(TypeError, match="v must have k's dtype"):
        associative_readout(k, k.double())
    with pytest.raises(TypeError, match="k must be a floating-point"):
        associative_readout(k.long(), k)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("capacity", [None, 300])
def test_gpu_realistic(dtype, capacity):
    check(make(2, 2048, 4, 64, dtype, "cuda", seed=10, key_scale=0.2), capacity, dtype)
