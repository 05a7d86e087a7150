"""memcore: hybrid memory layers for sequence models, defined once, checked on every backend.

    import memcore
    spec = memcore.spec.bmojo(d_model=64, n_heads=4, window=16, chunk=16, select=2, capacity=8)
    params = memcore.init(spec, seed=0)
    layer = memcore.realize(spec, backend="reference", params=params)
    y, state = layer(x, None)
    y_t, state = layer.step(x_t, state)
"""

from __future__ import annotations

from memcore import interop, spec
from memcore.api import check_finite, check_params, init, param_shapes, realize
from memcore.checkpoint import load, load_params, save
from memcore.registry import available_backends, get_backend, register_backend
from memcore.spec.sizes import allocation_limit, set_allocation_limit

__version__ = "0.1.0"

__all__ = [
    "spec", "init", "realize", "param_shapes", "check_params", "check_finite",
    "save", "load", "load_params", "interop",
    "available_backends", "get_backend", "register_backend", "ops", "testing",
    "set_allocation_limit", "allocation_limit",
]


def __getattr__(name):
    # ops and testing load on first use: testing needs hypothesis.
    if name in ("ops", "testing"):
        import importlib

        return importlib.import_module(f"memcore.{name}")
    raise AttributeError(f"module 'memcore' has no attribute {name!r}")
