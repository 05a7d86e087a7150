"""Kernel tests: Triton runs in interpret mode on the CPU where no CUDA device is present, and
compiled on the GPU where one is; MEMCORE_KERNELS_INTERPRET=1 or =0 forces either.
TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before triton or any
kernel module is imported. Each test module skips itself with the reason when triton is not
importable."""

from __future__ import annotations

import os

import pytest
import torch

_force = os.environ.get("MEMCORE_KERNELS_INTERPRET", "")
INTERPRET = _force == "1" or (_force != "0" and not torch.cuda.is_available())
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
# Every float buffer a kernel writes starts as NaN (see memcore.kernels.triton.buffers).
os.environ["MEMCORE_KERNELS_POISON"] = "1"


@pytest.fixture
def device():
    """Where the small tests put their tensors: the CPU when interpreted, else the GPU."""
    return "cpu" if INTERPRET else "cuda"
