"""The primitives of DESIGN section 2 as array-in/array-out functions, in both forms.

Each call looks at the type of its array arguments *at call time* and routes to the backend
registered for that array library (``register_ops``); an array library without a backend, or a
function a backend does not provide, runs on the Array API reference.
"""

from __future__ import annotations

import importlib

import array_api_compat

from memcore.spec.reference import ops as _reference

_OPS_MODULES = {
    # Array library -> module path of that backend's ops (imported on first use).
    "torch": "memcore.backends.torch.ops",
    "jax": "memcore.backends.jax.ops",
}
_LOADED: dict[str, object] = {}


def register_ops(library: str, module) -> None:
    """Route arrays of ``library`` ("torch", "jax", "numpy", ...) to ``module``'s functions."""
    _LOADED[library] = module


def _library(args, kwargs) -> str:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, dict):
            a = next(iter(a.values()), None)
        if a is None or not array_api_compat.is_array_api_obj(a):
            continue
        if array_api_compat.is_torch_array(a):
            return "torch"
        if array_api_compat.is_jax_array(a):
            return "jax"
        if array_api_compat.is_numpy_array(a):
            return "numpy"
        return type(a).__module__.split(".")[0]
    return "numpy"


def _impl(name: str, library: str):
    mod = _LOADED.get(library)
    if mod is None and library in _OPS_MODULES:
        try:
            mod = importlib.import_module(_OPS_MODULES[library])
        except ImportError:
            mod = _reference
        _LOADED[library] = mod
    fn = getattr(mod, name, None) if mod is not None else None
    return fn if fn is not None else getattr(_reference, name)


def _dispatching(name: str):
    ref = getattr(_reference, name)

    def op(*args, **kwargs):
        return _impl(name, _library(args, kwargs))(*args, **kwargs)

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = ref.__doc__
    return op


selective_scan = _dispatching("selective_scan")
selective_state_update = _dispatching("selective_state_update")
leaky_average = _dispatching("leaky_average")
leaky_average_step = _dispatching("leaky_average_step")
windowed_attention = _dispatching("windowed_attention")
windowed_attention_step = _dispatching("windowed_attention_step")
windowed_attention_state = _dispatching("windowed_attention_state")
associative_readout = _dispatching("associative_readout")
persistent_readout = _dispatching("persistent_readout")
store_top = _dispatching("store_top")
store_merge = _dispatching("store_merge")
innovation_scores = _dispatching("innovation_scores")

__all__ = list(_reference.__all__) + ["register_ops"]
