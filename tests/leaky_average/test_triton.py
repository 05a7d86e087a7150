"""Triton leaky average against the reference (memcore.spec.reference.leaky_average.leaky_average),
forward and gradients to k, log_decay and the initial state, and through the final state."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from kcheck import assert_close, assert_grads_close, gpu  # noqa: E402
from memcore.kernels.triton.leaky_average import (  # noqa: E402
    leaky_average,
    leaky_average_ref,
)
from memcore.spec.reference.leaky_average import leaky_average as spec_leaky  # noqa: E402


def make(Bt, T, H, E, dtype, device, h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(Bt, T, H, E, generator=g, dtype=torch.float64)
    # Memory Mosaics' decay -10|p|: strong and weak heads side by side
    p = torch.linspace(0.01, 0.3, H, dtype=torch.float64)
    args = {"k": k.to(device=device, dtype=dtype).requires_grad_(),
            "log_decay": (-10 * p).to(device=device, dtype=torch.float32 if dtype in (
                torch.bfloat16, torch.float16) else dtype).requires_grad_()}
    if h0:
        args["initial_state"] = torch.randn(Bt, H, E, generator=g, dtype=torch.float64).to(
            device=device, dtype=args["log_decay"].dtype).requires_grad_()
    return args


def check(args, chunk, dtype):
    y, hT = leaky_average(**args, return_final_state=True, chunk=chunk)
    yr, hr = spec_leaky(**args, return_final_state=True)
    assert y.dtype == args["k"].dtype and hT.dtype == hr.dtype
    assert_close("kbar", y, yr, dtype)
    assert_close("final_state", hT, hr, dtype)
    assert_grads_close((y, hT), (yr, hr), args, dtype)


# (batch, T, heads, head_dim, chunk): T off the chunk grid, T = 1, odd and wide head widths
# (a head width over the block splits into several programs), several chunks.
SHAPES = [(2, 11, 3, 5, 4), (1, 1, 2, 3, 8), (1, 20, 2, 70, 8), (2, 9, 1, 1, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}E{}c{}".format(*s))
def test_float64(shape, device):
    Bt, T, H, E, chunk = shape
    check(make(Bt, T, H, E, torch.float64, device), chunk, torch.float64)


def test_float64_no_initial_state_default_chunk(device):
    check(make(1, 40, 2, 4, torch.float64, device, h0=False, seed=2), 32, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype, device):
    check(make(2, 13, 2, 6, dtype, device, seed=4), 4, dtype)


def test_plain_loop_ref_matches_spec():
    args = make(2, 10, 3, 4, torch.float64, "cpu", seed=6)
    y, h = leaky_average_ref(**args, return_final_state=True)
    yr, hr = spec_leaky(**args, return_final_state=True)
    assert_close("kbar", y, yr, torch.float64)
    assert_close("h", h, hr, torch.float64)


def test_split_equals_one_pass(device):
    """Two calls chained through the final state equal one call (DESIGN contract 2)."""
    args = make(1, 12, 2, 3, torch.float64, device, seed=8)
    k, ld, h0 = args["k"], args["log_decay"], args["initial_state"]
    y, h = leaky_average(k, ld, h0, return_final_state=True, chunk=4)
    y1, h1 = leaky_average(k[:, :5], ld, h0, return_final_state=True, chunk=4)
    y2, h2 = leaky_average(k[:, 5:], ld, h1, return_final_state=True, chunk=4)
    assert_close("kbar", torch.cat([y1, y2], 1), y, torch.float64)
    assert_close("final_state", h2, h, torch.float64)


def test_bad_input_names_the_argument():
    k = torch.zeros(1, 3, 2, 4)
    with pytest.raises(ValueError, match="log_decay must be"):
        leaky_average(k, torch.zeros(3))
    with pytest.raises(ValueError, match="k must be"):
        leaky_average(k[0], torch.zeros(2))
    with pytest.raises(ValueError, match="initial_state must be"):
        leaky_average(k, torch.zeros(2), torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match="k must be a floating-point"):
        leaky_average(k.long(), torch.zeros(2))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_realistic(dtype):
    check(make(4, 2048, 8, 96, dtype, "cuda", seed=10), 32, dtype)
