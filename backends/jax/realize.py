"""Entry point of the ``jax`` backend (registered in pyproject's ``memcore.backends``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from memcore.spec.base import Spec
from memcore.spec.layers import LAYER_KINDS
from memcore.spec.model import Model
from memcore.spec.params import check_params, init
from memcore.spec.sizes import check_allocation

from .modules import JaxLayer, JaxModel
from .numerics import POS_DTYPE
from .state import State, floating_dtype


def realize(spec: Spec, params: dict | None = None, seed: int = 0, dtype=None, **options):
    """A ``JaxLayer`` or ``JaxModel`` (``memcore.backends.jax.modules``).

    params: ``memcore.init``'s dict (default ``init(spec, seed)``), kept in its dtype unless
    ``dtype`` is given.
    """
    if options:
        raise TypeError(f"realize (jax): unknown options {sorted(options)}; accepted: dtype")
    if not isinstance(spec, (Model,) + LAYER_KINDS):
        raise TypeError(f"spec must be a memcore layer or model spec, got {spec!r}")
    if dtype is not None:
        floating_dtype("realize (jax)", dtype)
    params = init(spec, seed) if params is None else params
    check_params(spec, params)
    check_allocation(spec, what="state")
    arrays = {}
    for name, value in params.items():
        if not isinstance(value, (jax.Array, np.ndarray)):
            value = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        a = jnp.asarray(value)
        arrays[name] = a if dtype is None else a.astype(dtype)
    cls = JaxModel if isinstance(spec, Model) else JaxLayer
    return cls(arrays, spec)


__all__ = ["realize", "JaxLayer", "JaxModel", "State", "POS_DTYPE"]
