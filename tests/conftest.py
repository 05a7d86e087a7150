"""Shared test setup: float64 everywhere (JAX needs x64 switched on before any array exists),
Triton's interpreter where no CUDA device is present, poisoned kernel buffers, one torch thread,
and hypothesis profiles sized for CI's 2 cores.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before triton or any
kernel module is imported; MEMCORE_KERNELS_INTERPRET=1 or =0 forces the interpreter on or off.
Test modules that need triton skip themselves with the reason when it is not importable."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

_force = os.environ.get("MEMCORE_KERNELS_INTERPRET", "")
INTERPRET = _force == "1" or (_force != "0" and not torch.cuda.is_available())
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
# Every float buffer a kernel writes starts as NaN (see memcore.kernels.triton.buffers).
os.environ["MEMCORE_KERNELS_POISON"] = "1"
# The tests run tiny tensors: one intra-op thread avoids hand-off costs that dominate at these
# sizes on CI's 2 shared cores.
if torch is not None:
    torch.set_num_threads(1)

# Tests import with --import-mode=importlib (test files in different folders share names such
# as test_torch.py); the shared helpers (refcheck, torchcheck, jaxcheck, kcheck, ...) live in
# tests/support and are found through sys.path.
_HERE = pathlib.Path(__file__).resolve().parent

# Before the root goes on sys.path: Hugging Face's `kernels`, not the kernels/ folder (after the
# environment above, since memcore loads here).
from memcore.shadowed_packages import import_installed  # noqa: E402

import_installed("kernels", "memcore.kernels")
# The repository root too: with importlib imports a test module is named tests.<folder>.<file>,
# and processes a test spawns re-import it by that name.
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))
if str(_HERE / "support") not in sys.path:
    sys.path.insert(0, str(_HERE / "support"))

try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # JAX is optional; tests that need it skip with the reason
    pass

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def device():
    """Where the small kernel tests put their tensors: the CPU when interpreted, else the GPU."""
    return "cpu" if INTERPRET else "cuda"
