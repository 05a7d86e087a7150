"""Kernel tests: Triton runs in interpret mode on the CPU unless MEMCORE_KERNELS_GPU=1 asks for
compiled kernels on a CUDA device. TRITON_INTERPRET is read when a kernel is decorated, so it
must be set before triton (or any kernel module) is imported. Each test module skips itself
with the reason when triton is not importable."""

from __future__ import annotations

import os

import pytest

COMPILED = os.environ.get("MEMCORE_KERNELS_GPU", "") == "1"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"
# Every float buffer a kernel writes starts as NaN (see memcore.kernels.triton.buffers).
os.environ["MEMCORE_KERNELS_POISON"] = "1"


@pytest.fixture
def device():
    """CPU in interpret mode; the GPU when the kernels are compiled."""
    return "cuda" if COMPILED else "cpu"
