"""mamba-ssm's CUDA ``selective_scan_fn`` as an optional path for the selective scan.

mamba-ssm's function has the same semantics as memcore's scan (DESIGN 2.1) but no initial
state, and its backward ignores the gradient of the final state (its docstring says so). So it
serves only calls whose initial state is absent, or all zeros with no gradient wanted (a
layer's first call passes its zero initial state), and the final state it returns refuses, at
backward time, a gradient that is not zero: such a loss needs the Triton kernel. Whether it is
used at all is decided by ``memcore.backends.torch.selective_scan`` (``implementation=``,
``scan_path``).

mamba-ssm wants A, D and delta_bias in float32 and delta, B, C and z in u's dtype (float32,
float16 or bfloat16); the casts here keep autograd to the caller's tensors.
"""

from __future__ import annotations

import functools

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def mamba_ssm_scan_fn():
    """mamba-ssm's ``selective_scan_fn``, or None where mamba-ssm (with its CUDA extension) does
    not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - any failure (no package, no CUDA build) means absent
        return None
    return selective_scan_fn


def servable(u, initial_state) -> bool:
    """Whether mamba-ssm's function computes this call: a dtype it takes, and no initial state
    (or an all-zero one that wants no gradient; checking reads the device once)."""
    if u.dtype not in DTYPES:
        return False
    if initial_state is None:
        return True
    return not initial_state.requires_grad and not bool(initial_state.any())


def check_servable(u, initial_state) -> None:
    """Raise, saying why, where mamba-ssm's function cannot compute this call."""
    if not servable(u, initial_state):
        raise ValueError(f"selective_scan: mamba-ssm's path takes float32/float16/bfloat16 and "
                         f"no initial state (or an all-zero one without gradient), got "
                         f"u {u.dtype}, initial_state "
                         f"{None if initial_state is None else tuple(initial_state.shape)}")


class _NoGradThroughState(torch.autograd.Function):
    """Identity on the final state whose backward refuses a non-zero gradient, which
    mamba-ssm's backward would silently drop."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, dh):
        if bool(dh.ne(0).any()):
            raise RuntimeError(
                "selective_scan: the loss depends on the final state, and mamba-ssm's "
                "selective_scan_fn gives no gradient through it; set MEMCORE_SCAN=triton to "
                "run the Triton kernel, which does")
        return dh


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False):
    """memcore's selective scan on mamba-ssm's function; the caller checked ``servable``.
    Returns y in u's dtype and, with ``return_final_state``, h_T in float32."""
    fn = mamba_ssm_scan_fn()
    if fn is None:
        raise ImportError("selective_scan: mamba-ssm's selective_scan_fn is not importable "
                          "(pip install mamba-ssm, built with CUDA)")
    check_servable(u, initial_state)
    dt = u.dtype
    f32 = torch.float32
    out = fn(u, delta.to(dt), A.to(f32), B.to(dt), C.to(dt),
             None if D is None else D.to(f32), None if z is None else z.to(dt),
             None if delta_bias is None else delta_bias.to(f32), bool(delta_softplus),
             bool(return_final_state))
    if not return_final_state:
        return out.to(dt)
    y, hT = out
    return y.to(dt), _NoGradThroughState.apply(hT.to(f32))
