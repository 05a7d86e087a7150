"""The implementation a primitive's call runs: ``"torch"`` or a kernel.

Every primitive function takes ``implementation="auto" | "torch" | "triton"`` (the selective
scan also ``"mamba_ssm"``). ``auto`` takes the Triton kernel for CUDA tensors when triton is
importable, else torch; ``MEMCORE_KERNELS=triton|torch`` sets what ``auto`` means whatever the
device (tests force the kernels on CPU tensors under ``TRITON_INTERPRET=1``). An explicit choice
that cannot run raises at once, saying why. The selective scan's kernel path is the Triton
kernel or mamba-ssm's CUDA function (``scan_path``, ``MEMCORE_SCAN``). Kernel modules import
triton, so they are imported only once a kernel is chosen: a CPU-only install never imports
triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import implementation as shared

ENV = shared.ENV
CHOICES = ("auto", "torch", "triton")
SCAN_ENV = "MEMCORE_SCAN"
SCAN_CHOICES = ("triton", "mamba_ssm")
# No GPU benchmark has compared the two yet (benchmarks/gpu.py does): the Triton kernel, which
# serves every call, until one shows mamba-ssm's faster.
DEFAULT_SCAN = "triton"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton kernels run in the interpreter (which takes CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def env_mode() -> str:
    """``MEMCORE_KERNELS``: "triton", "torch" or "" (unset: the device decides)."""
    return shared.env_mode("torch", "triton")


def auto_kernel(x) -> bool:
    """What ``auto`` means for a call on ``x``: whether it takes the Triton kernel."""
    mode = env_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise ImportError(f"{ENV}=triton asks for the Triton kernels, but triton is not "
                              f"installed (pip install 'memcore[triton]')")
        return True
    return isinstance(x, torch.Tensor) and x.is_cuda and triton_available()


def check_choice(where: str, implementation, choices=CHOICES) -> None:
    shared.check_choice(where, implementation, choices)


def require_triton(where: str, x) -> None:
    """Raise, saying why, where the Triton kernel cannot run a call on ``x``."""
    if not triton_available():
        raise ImportError(f"{where}: implementation='triton' needs triton, which is not "
                          f"installed (pip install 'memcore[triton]')")
    if not (x.is_cuda or interpreted()):
        raise ValueError(f"{where}: implementation='triton' runs on CUDA tensors (or CPU "
                         f"tensors under TRITON_INTERPRET=1), got a tensor on {x.device}")


def choose(where: str, implementation, x, unserved: str | None = None,
           choices=CHOICES) -> str:
    """"torch" or "triton" for a call on ``x``. ``unserved``: why the kernel cannot compute
    this call (None: it can); ``auto`` then takes torch, an explicit "triton" raises."""
    check_choice(where, implementation, choices)
    return shared.choose(where, implementation, plain="torch", kernel="triton",
                         auto_kernel=lambda: auto_kernel(x),
                         require=lambda: require_triton(where, x), unserved=unserved)


def scan_path(u, initial_state=None) -> str:
    """Which GPU path runs a selective scan that takes the kernels under ``auto``: "triton" or
    "mamba_ssm". mamba-ssm's is taken only where chosen (``MEMCORE_SCAN``, else
    ``DEFAULT_SCAN``), importable, and able to compute the call (no initial state). Asked for
    by ``MEMCORE_SCAN`` but not importable, it raises; as the default, it falls back to the
    Triton kernel."""
    from memcore.kernels.triton import selective_scan_mamba_ssm as mss

    mode = os.environ.get(SCAN_ENV, "").strip().lower()
    if mode not in SCAN_CHOICES + ("",):
        raise ValueError(f"{SCAN_ENV} must be one of {SCAN_CHOICES} or unset, got {mode!r}")
    if (mode or DEFAULT_SCAN) != "mamba_ssm":
        return "triton"
    if mss.mamba_ssm_scan_fn() is None:
        if mode:
            raise ImportError(f"{SCAN_ENV}=mamba_ssm asks for mamba-ssm's selective_scan_fn, "
                              f"which does not import (pip install mamba-ssm, built with CUDA)")
        return "triton"
    return "mamba_ssm" if mss.servable(u, initial_state) else "triton"


SCAN_IMPLEMENTATIONS = ("auto", "torch", "triton", "mamba_ssm")


def scan_choice(implementation, u, initial_state, packed: bool = False) -> str:
    """The path of one selective scan: "torch", "triton" or "mamba_ssm". ``packed`` (a call
    with cu_seqlens): mamba-ssm's kernel takes no boundaries, the Triton kernel does."""
    check_choice("selective_scan", implementation, SCAN_IMPLEMENTATIONS)
    if packed and implementation == "mamba_ssm":
        raise ValueError("selective_scan: implementation='mamba_ssm' takes no cu_seqlens "
                         "(mamba-ssm's selective_scan_fn has no document boundaries); use "
                         "'triton', 'torch' or 'auto'")
    if packed and implementation == "auto":
        return "triton" if u.shape[2] and auto_kernel(u) else "torch"
    if implementation == "mamba_ssm":
        from memcore.kernels.triton import selective_scan_mamba_ssm as mss

        if mss.mamba_ssm_scan_fn() is None:
            raise ImportError("selective_scan: implementation='mamba_ssm' needs mamba-ssm's "
                              "selective_scan_fn, which does not import (pip install "
                              "mamba-ssm, built with CUDA)")
        mss.check_servable(u, initial_state)
        return "mamba_ssm"
    if implementation == "auto":
        if u.shape[2] == 0 or not auto_kernel(u):
            return "torch"
        return scan_path(u, initial_state)
    return choose("selective_scan", implementation, u)
