"""The implementation a primitive's call runs: ``"jax"`` or the Pallas kernel.

Every primitive function with a kernel takes ``implementation="auto" | "jax" | "pallas"``.
``auto`` takes the kernel for arrays on a GPU, else plain JAX; ``MEMCORE_KERNELS=pallas|jax``
sets what ``auto`` means whatever the device (forced onto a CPU, the kernels run in the Pallas
interpreter). An explicit choice that cannot run raises at once, saying why. The realized
modules resolve ``auto`` once per call, outside jit, from the concrete arrays, and pass the
concrete string down as a static argument, so a compiled computation serves one path only.
Kernel modules import Pallas, so they are imported only once a kernel is chosen.
"""

from __future__ import annotations

import importlib.util

import jax

from .. import implementation as shared

ENV = shared.ENV
CHOICES = ("auto", "jax", "pallas")


def pallas_available() -> bool:
    try:
        return importlib.util.find_spec("jax.experimental.pallas") is not None
    except ModuleNotFoundError:
        return False


def on_gpu(x) -> bool:
    from memcore.kernels.pallas.device import on_gpu as device_on_gpu

    return device_on_gpu(x)


def interpret(x) -> bool:
    """Whether the kernel runs in the Pallas interpreter for a call on ``x`` (off a GPU)."""
    return not on_gpu(x)


def env_mode() -> str:
    """``MEMCORE_KERNELS``: "pallas", "jax" or "" (unset: the device decides)."""
    return shared.env_mode("jax", "pallas")


def auto_kernel(x) -> bool:
    """What ``auto`` means for a call on ``x``: whether it takes the Pallas kernels."""
    mode = env_mode()
    if mode:
        return mode == "pallas"
    return isinstance(x, jax.Array) and on_gpu(x)


def resolve(x, packed: bool = False) -> str:
    """``auto`` for a call on ``x`` as a concrete choice: "pallas" (the kernels, where a
    primitive has one) or "jax". The realized modules take it outside jit. A ``packed`` row
    (cu_seqlens) chooses the same way: the kernels take document boundaries, and where one
    cannot serve a packed call (the readout with a store) the layer runs that part on JAX.
    ``packed`` stays for the callers that pass it."""
    return "pallas" if auto_kernel(x) else "jax"


def require_pallas(where: str) -> None:
    if not pallas_available():
        raise ImportError(f"{where}: implementation='pallas' needs jax.experimental.pallas, "
                          f"which this jax install lacks")


def choose(where: str, implementation, x, unserved: str | None = None) -> str:
    """"jax" or "pallas" for a call on ``x``. ``unserved``: why the kernel cannot compute this
    call (None: it can); ``auto`` then takes plain JAX, an explicit "pallas" raises."""
    return shared.choose(where, implementation, plain="jax", kernel="pallas",
                         auto_kernel=lambda: auto_kernel(x),
                         require=lambda: require_pallas(where), unserved=unserved)


def plain_only(where: str, implementation) -> None:
    """For a primitive without a Pallas kernel: "auto" and "jax" run JAX, "pallas" raises."""
    choose(where, implementation, None, unserved="it has no Pallas kernel")
