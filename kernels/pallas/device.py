"""Where a Pallas call runs: compiled for a GPU, or in the Pallas interpreter elsewhere."""

from __future__ import annotations

import jax


def on_gpu(array) -> bool:
    """Whether ``array`` lives on a GPU. A tracer inside jit has no device yet: it will run on
    the default backend, so that decides."""
    try:
        devices = array.devices()
    except (AttributeError, jax.errors.ConcretizationTypeError):
        return isinstance(array, jax.Array) and jax.default_backend() == "gpu"
    return any(d.platform == "gpu" for d in devices)
