"""Comparisons for the kernel tests (tolerances from DESIGN section 6)."""

from __future__ import annotations

import os

import pytest
import torch

# relative RMSE allowed, by the dtype of the inputs
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_rmse(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if got.numel() == 0:
        return 0.0  # nothing to compare, and the shapes agree
    if not torch.isfinite(got).all():
        return float("inf")  # NaN never passes
    err = (got - want).pow(2).mean().sqrt()
    scale = want.pow(2).mean().sqrt()
    return float(err / scale) if scale > 0 else float(err)


def assert_close(name: str, got, want, dtype) -> None:
    tol = TOL[dtype]
    e = rel_rmse(got, want)
    assert e <= tol, f"{name}: relative RMSE {e:.3e} > {tol:.0e}"


def grads(out, inputs, cotangents):
    """Gradients of sum(out_i * cot_i) with respect to the inputs that require them."""
    live = [x for x in inputs if x is not None and x.requires_grad]
    loss = sum((o.float() * c.float()).sum() if o.dtype in (torch.bfloat16, torch.float16)
               else (o * c).sum() for o, c in zip(out, cotangents, strict=True))
    return torch.autograd.grad(loss, live)


def assert_grads_close(got_out, want_out, inputs: dict, dtype, seed: int = 1) -> None:
    """The gradients of the kernel's outputs and of the reference's to every input, against one
    float64 normal cotangent per output drawn from ``seed``: each in its input's dtype and
    within the dtype's tolerance."""
    g = torch.Generator().manual_seed(seed)
    cot = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in got_out)
    got = grads(got_out, list(inputs.values()), cot)
    want = grads(want_out, list(inputs.values()), cot)
    for name, a, b in zip(inputs, got, want, strict=True):
        assert a.dtype == inputs[name].dtype, name
        assert_close(f"d{name}", a, b, dtype)


# where the kernels run in this test run (conftest set TRITON_INTERPRET before this import)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "") == "1" else "cuda"

gpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "") == "1" or not torch.cuda.is_available(),
    reason="realistic sizes need a CUDA device and compiled (not interpreted) kernels",
)
