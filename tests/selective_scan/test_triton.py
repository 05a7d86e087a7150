"""Triton selective scan against the reference (``memcore.spec.reference.selective_scan``),
forward and gradients, including the initial state in and the final state out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from kcheck import assert_close, assert_grads_close, gpu, grads  # noqa: E402
from memcore.kernels.triton.selective_scan import (  # noqa: E402
    selective_scan,
    selective_scan_ref,
)
from memcore.spec.reference.selective_scan import selective_scan as spec_scan  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make(Bt, Dc, T, N, G, dtype, device, full=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    shp = (Bt, N, T) if G is None else (Bt, G, N, T)
    args = {
        "u": r(Bt, Dc, T), "delta": r(Bt, Dc, T, scale=0.5),
        "A": -torch.rand(Dc, N, generator=g, dtype=torch.float64) - 0.2,
        "B": r(*shp), "C": r(*shp),
    }
    if full:
        args.update(D=r(Dc), z=r(Bt, Dc, T), delta_bias=r(Dc, scale=0.3),
                    initial_state=r(Bt, Dc, N))
    # A, D and delta_bias stay float32 for half inputs, as in mamba-ssm
    half = dtype in (torch.bfloat16, torch.float16)
    out = {}
    for k, v in args.items():
        dt = torch.float32 if half and k in ("A", "D", "delta_bias", "initial_state") else dtype
        out[k] = v.to(device=device, dtype=dt).requires_grad_()
    return out


def run_both(args, softplus, chunk):
    y, hT = selective_scan(**args, delta_softplus=softplus, return_final_state=True, chunk=chunk)
    yr, hr = spec_scan(**args, delta_softplus=softplus, return_final_state=True)
    return (y, hT), (yr, hr)


def check(args, softplus, chunk, dtype):
    (y, hT), (yr, hr) = run_both(args, softplus, chunk)
    assert y.dtype == args["u"].dtype and hT.dtype == hr.dtype
    assert_close("y", y, yr, dtype)
    assert_close("final_state", hT, hr, dtype)
    assert_grads_close((y, hT), (yr, hr), args, dtype)


# (batch, channels, T, d_state, groups, chunk): T off the chunk grid, T = 1, T < chunk,
# grouped B/C with odd group width, odd d_state, several chunks.
SHAPES = [
    (2, 4, 19, 5, None, 8),
    (1, 3, 1, 3, None, 8),
    (2, 6, 13, 4, 3, 4),
    (1, 8, 16, 2, 2, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Dc{}T{}N{}G{}c{}".format(*s))
def test_float64_all_options(shape, device):
    Bt, Dc, T, N, G, chunk = shape
    check(make(Bt, Dc, T, N, G, torch.float64, device), True, chunk, torch.float64)


def test_float64_no_options(device):
    """No D, z, bias, softplus or initial state: the plain recurrence."""
    check(make(2, 4, 11, 3, None, torch.float64, device, full=False), False, 4, torch.float64)


def test_default_chunk_several_chunks(device):
    check(make(1, 2, 70, 3, None, torch.float64, device, seed=3), True, 32, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_low_precision(dtype, device):
    check(make(2, 4, 12, 4, 2, dtype, device, seed=5), True, 8, dtype)


def test_final_state_only_gradient(device):
    """A loss on the final state alone still reaches every input (dy is None)."""
    args = make(1, 2, 9, 3, None, torch.float64, device, seed=7)
    _, hT = selective_scan(**args, delta_softplus=True, return_final_state=True, chunk=4)
    _, hr = spec_scan(**args, delta_softplus=True, return_final_state=True)
    got = torch.autograd.grad(hT.sum(), list(args.values()), allow_unused=True)
    want = torch.autograd.grad(hr.sum(), list(args.values()), allow_unused=True)
    for name, a, b in zip(NAMES, got, want, strict=True):
        if b is None:  # z and D do not reach the state
            assert a is None or not a.abs().max() > 0, name
            continue
        assert_close(f"d{name}", a, b, torch.float64)


def test_plain_loop_ref_matches_spec():
    args = make(2, 6, 10, 3, 3, torch.float64, "cpu", seed=9)
    y, h = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    yr, hr = spec_scan(**args, delta_softplus=True, return_final_state=True)
    assert_close("y", y, yr, torch.float64)
    assert_close("h", h, hr, torch.float64)


def test_bad_input_names_the_argument():
    args = make(1, 4, 5, 3, None, torch.float64, "cpu", full=False)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(args["u"], args["delta"], args["A"][:, None], args["B"], args["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(args["u"], args["delta"], args["A"], args["B"][:, :, :2], args["C"])
    with pytest.raises(ValueError, match="groups dividing"):
        selective_scan(args["u"], args["delta"], args["A"],
                       args["B"][:, None].expand(1, 3, 3, 5), args["C"])
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"],
                       initial_state=torch.zeros(1, 4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="u must be a floating-point"):
        selective_scan(args["u"].long(), args["delta"], args["A"], args["B"], args["C"])
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        selective_scan(args["u"], args["delta"], args["A"], args["B"], args["C"], chunk=6)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_realistic(dtype):
    check(make(2, 256, 1000, 16, None, dtype, "cuda", seed=11), True, 32, dtype)


def test_empty_sequence_passes_the_state_through(device):
    args = make(1, 2, 0, 3, None, torch.float64, device, seed=12)
    y, hT = selective_scan(**args, delta_softplus=True, return_final_state=True)
    assert y.shape == (1, 2, 0)
    assert_close("final_state", hT, args["initial_state"], torch.float64)
    (dh0,) = torch.autograd.grad((hT * 2).sum(), [args["initial_state"]])
    assert_close("dinitial_state", dh0, torch.full_like(dh0, 2.0), torch.float64)


def _mamba_cuda_scan():
    """mamba-ssm's CUDA selective_scan_fn, or None where it cannot run (no CUDA, no build)."""
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # mamba-ssm absent, or installed without its CUDA extension
        return None
    return selective_scan_fn


@gpu
@pytest.mark.skipif(_mamba_cuda_scan() is None,
                    reason="needs mamba-ssm's CUDA selective_scan_fn (mamba-ssm built with CUDA)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_agrees_with_mamba_ssm(dtype):
    """Without an initial state (mamba-ssm has none) the two scans agree, forward and backward;
    mamba-ssm ignores the final state's gradient, so only y carries one."""
    args = make(2, 512, 1000, 16, None, dtype, "cuda", seed=13)
    args.pop("initial_state")
    y, hT = selective_scan(**args, delta_softplus=True, return_final_state=True)
    ym, hm = _mamba_cuda_scan()(*args.values(), delta_softplus=True, return_last_state=True)
    assert_close("y", y, ym, dtype)
    assert_close("final_state", hT, hm, dtype)
    dy = torch.randn_like(y)
    got = grads((y,), list(args.values()), (dy,))
    want = grads((ym,), list(args.values()), (dy,))
    for name, a, b in zip(args, got, want, strict=True):
        assert_close(f"d{name}", a, b, dtype)
