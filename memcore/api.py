"""``memcore.init`` and ``memcore.realize``."""

from __future__ import annotations

import numpy as np

from memcore.spec import LAYER_KINDS, Model, Spec
from memcore.spec.params import check_params, init, param_shapes
from memcore.spec.sizes import check_allocation

from .registry import get_backend

__all__ = ["init", "realize", "param_shapes", "check_params", "check_finite"]


def check_finite(params: dict) -> None:
    """Raise a ValueError naming every parameter that holds a NaN or an infinity."""
    bad = []
    for name, value in params.items():
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if not np.all(np.isfinite(arr)):
            bad.append(f"{name} ({int(np.sum(~np.isfinite(arr)))} non-finite values)")
    if bad:
        raise ValueError("params hold non-finite values: " + ", ".join(bad))


def realize(spec: Spec, backend: str = "reference", params: dict | None = None, seed: int = 0,
            check: bool = False, **options):
    """The backend's native object for ``spec``: a ``torch.nn.Module`` for "torch", an
    ``equinox.Module`` for "jax", a plain object for "reference".

    params: a dict from ``memcore.init`` (default: ``init(spec, seed)``). ``check=True`` also
    rejects parameters holding NaN or infinity. A spec whose parameters or batch-1 state would
    exceed the allocation limit (``memcore.set_allocation_limit``) is refused here.
    """
    if not isinstance(spec, (Model,) + LAYER_KINDS):
        raise TypeError(f"spec must be a memcore layer or model spec, got {spec!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str), got {backend!r}")
    factory = get_backend(backend)
    check_allocation(spec, what="state" if params is not None else "both")
    if params is not None:
        check_params(spec, params)
        if check:
            check_finite(params)
    return factory(spec, params=params, seed=seed, **options)
