"""Buffer allocation shared by the Triton kernels.

Tests set ``MEMCORE_KERNELS_POISON=1`` so that every floating-point buffer a kernel writes
starts as NaN, and every integer buffer at the type's most negative value: an element the kernel
forgets to write then fails the comparison instead of passing by luck with whatever the
allocator left there.
"""

from __future__ import annotations

import functools
import os

import torch


def poisoned() -> bool:
    return os.environ.get("MEMCORE_KERNELS_POISON", "") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    """An uninitialised buffer, or a poisoned one when poisoning is on."""
    if poisoned() and dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    if poisoned() and dtype != torch.bool:
        return torch.full(tuple(shape), torch.iinfo(dtype).min, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type accumulates in float32 (DESIGN 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(where: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {t.dtype}")


def check_device(where: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{where}: {name} must be on {ref.device}, got {t.device}")


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs under TRITON_INTERPRET (decided when it was decorated)."""
    return type(kernel).__name__ == "InterpretedFunction"


def shared_memory_per_block(device) -> int | None:
    """Most shared memory (bytes) one block may use on ``device``, as triton checks it at
    launch; None off CUDA. ``memcore.kernels.triton.aot`` replaces it with a target's."""
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_shared(index)


@functools.cache
def _max_shared(index: int) -> int:
    from triton.compiler.compiler import max_shared_mem

    return int(max_shared_mem(index))
