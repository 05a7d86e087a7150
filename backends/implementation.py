"""How a primitive's call picks its implementation, the same rule in both backends.

Each backend has a plain path ("torch", "jax") and a kernel path ("triton", "pallas").
``implementation="auto"`` takes the kernel where the backend says it pays (arrays on a GPU),
``MEMCORE_KERNELS`` overrides what ``auto`` means whatever the device, and an explicit argument
always wins. An explicit kernel choice that cannot run raises at once, saying why.
"""

from __future__ import annotations

import os

ENV = "MEMCORE_KERNELS"


def env_mode(plain: str, kernel: str) -> str:
    """``MEMCORE_KERNELS``: ``plain``, ``kernel`` or "" (unset: the device decides)."""
    mode = os.environ.get(ENV, "").strip().lower()
    if mode not in (kernel, plain, ""):
        raise ValueError(f"{ENV} must be one of {(kernel, plain)} or unset, got {mode!r}")
    return mode


def check_choice(where: str, implementation, choices: tuple) -> None:
    if implementation not in choices:
        raise ValueError(f"{where}: implementation must be one of {choices}, got "
                         f"{implementation!r}")


def choose(where: str, implementation, *, plain: str, kernel: str, auto_kernel, require,
           unserved: str | None = None) -> str:
    """``plain`` or ``kernel`` for one call. ``auto_kernel()``: whether ``auto`` takes the
    kernel; ``require()``: raises, saying why, where the kernel cannot run at all;
    ``unserved``: why the kernel cannot compute this call (None: it can), in which case
    ``auto`` takes the plain path and an explicit kernel choice raises."""
    check_choice(where, implementation, ("auto", plain, kernel))
    if implementation == plain:
        return plain
    if implementation == "auto":
        return kernel if unserved is None and auto_kernel() else plain
    require()
    if unserved is not None:
        raise ValueError(f"{where}: implementation={kernel!r} cannot run this call: {unserved}")
    return kernel
