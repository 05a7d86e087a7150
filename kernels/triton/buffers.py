"""Buffers, dtypes and tile sizes shared by the Triton kernels.

Tests set ``MEMCORE_KERNELS_POISON=1`` so that every floating-point buffer a kernel writes
starts as NaN, and every integer buffer at the type's most negative value: an element the kernel
forgets to write then fails the comparison instead of passing by luck with whatever the
allocator left there.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


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


def tl_acc(dtype: torch.dtype):
    """``acc_dtype`` as a triton dtype, for the kernels' ``ACC`` argument."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_float(where: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {t.dtype}")


def check_device(where: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{where}: {name} must be on {ref.device}, got {t.device}")


def check_same_shape(where: str, name: str, t, like: str, ref: torch.Tensor) -> None:
    """``t`` (None: not given) has the shape of ``ref``, the argument named ``like``."""
    if t is not None and tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{where}: {name} must have {like}'s shape {tuple(ref.shape)}, got "
                         f"{tuple(t.shape)}")


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


MIN_BLOCK = 16  # tl.dot needs tiles of at least 16 on GPUs


BIG_SHARED = 160 * 1024  # A100 and H100 let a block have 163 and 227 KB; sm_86/89 have 99


def gpu_tile(dtype: torch.dtype, block_e: int, shared: int | None = None) -> int:
    """Query and key tile length on a GPU whose blocks may have ``shared`` bytes of shared
    memory (None: an A100 or newer data-centre GPU). The key and value kernel keeps several
    [tile, block_e] tiles and their pipelined copies there, about 8 * tile * row bytes: a row
    of 256 bytes (bfloat16 at width 128) with 64-row tiles takes 132 KB. So FlashAttention's
    64 while a row takes at most 256 bytes (128 where the GPU has 99 KB), else 32, and 16
    for rows over 256 bytes on the smaller GPUs (float32 at width 128 with 32-row tiles needs
    103 KB)."""
    if dtype == torch.float64:
        return 32 if shared is None or shared >= BIG_SHARED else 16
    row = dtype.itemsize * block_e
    if shared is None or shared >= BIG_SHARED:
        return 64 if row <= 256 else 32
    return 64 if row <= 128 else 32 if row <= 256 else 16


class TileConfig:
    """Tiles and flags of the softmax kernels (windowed and associative readout) for one call on
    ``dtype`` at head width E: the width's tile ``BE``, the query and key tiles ``BM``, ``BN``
    (the smallest legal tile when ``kernel`` runs interpreted, else ``gpu_tile`` for the
    device's shared memory), ``ieee`` (float32 without tf32, DESIGN 6; bfloat16 under the
    interpreter gets float32 copies) and ``acc``."""

    def __init__(self, dtype: torch.dtype, E: int, kernel, device):
        self.BE = max(triton.next_power_of_2(E), MIN_BLOCK)
        self.BM = self.BN = MIN_BLOCK
        if not interpreted(kernel):
            self.BM = self.BN = gpu_tile(dtype, self.BE, shared_memory_per_block(device))
        self.ieee = 1 if dtype == torch.float32 else 0
        if dtype == torch.bfloat16 and interpreted(kernel):
            self.ieee = 2
        self.acc = tl_acc(dtype)
