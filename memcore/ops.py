"""The primitives of DESIGN section 2 as array-in/array-out functions, in both forms.

Each call looks at the type of its array arguments *at call time* and routes to the primitive
function of that array library's tree: ``memcore.backends.torch.<primitive>`` for torch tensors,
``memcore.backends.jax.<primitive>`` for JAX arrays, ``memcore.spec.reference.<primitive>``
otherwise. So an op takes the path a layer takes (a kernel for CUDA tensors, where one exists).
``implementation=`` is passed through to the backend; the reference has one implementation
and accepts only ``"auto"``. ``register_ops`` routes another array library.
"""

from __future__ import annotations

import functools
import importlib

import array_api_compat

# Function -> the primitive (file name, the same in every tree) that defines it.
PRIMITIVE_OF = {
    "selective_scan": "selective_scan",
    "selective_state_update": "selective_scan",
    "leaky_average": "leaky_average",
    "leaky_average_step": "leaky_average",
    "windowed_readout": "windowed_readout",
    "windowed_readout_step": "windowed_readout",
    "windowed_readout_state": "windowed_readout",
    "associative_readout": "associative_readout",
    "persistent_readout": "persistent_readout",
    "store_top": "eidetic_store",
    "store_merge": "eidetic_store",
    "innovation_scores": "eidetic_store",
}
REFERENCE = "memcore.spec.reference"
# Array library -> the package holding its tree's primitive files (imported on first use).
BACKENDS = {"torch": "memcore.backends.torch", "jax": "memcore.backends.jax"}
_REGISTERED: dict[str, object] = {}


def register_ops(library: str, module) -> None:
    """Route arrays of ``library`` ("torch", "jax", "numpy", ...) to ``module``'s functions
    (those it defines; the others keep their route)."""
    _REGISTERED[library] = module


def library_of(args, kwargs) -> str:
    """The array library of the first array among the arguments (a dict: its first value)."""
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


@functools.cache
def _module(package: str, primitive: str):
    """``package.primitive``, or None while that module does not exist."""
    path = f"{package}.{primitive}"
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name is not None and path.startswith(err.name):
            return None  # the module (or its package) is absent; any other import error raises
        raise


def route(name: str, library: str):
    """The function ``memcore.ops.<name>`` runs for arrays of ``library``."""
    if name not in PRIMITIVE_OF:
        raise ValueError(f"route: unknown op {name!r}; ops are {sorted(PRIMITIVE_OF)}")
    fn = getattr(_REGISTERED.get(library), name, None)
    if fn is None and library in BACKENDS:
        fn = getattr(_module(BACKENDS[library], PRIMITIVE_OF[name]), name, None)
    return fn if fn is not None else getattr(_module(REFERENCE, PRIMITIVE_OF[name]), name)


def _dispatching(name: str):
    ref = route(name, "numpy")

    def op(*args, **kwargs):
        fn = route(name, library_of(args, kwargs))
        if fn is ref and "implementation" in kwargs:
            choice = kwargs.pop("implementation")
            if choice != "auto":
                raise ValueError(f"{name}: implementation={choice!r} is not available for these "
                                 f"arrays; the reference has one implementation (use 'auto')")
        return fn(*args, **kwargs)

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = ref.__doc__
    return op


selective_scan = _dispatching("selective_scan")
selective_state_update = _dispatching("selective_state_update")
leaky_average = _dispatching("leaky_average")
leaky_average_step = _dispatching("leaky_average_step")
windowed_readout = _dispatching("windowed_readout")
windowed_readout_step = _dispatching("windowed_readout_step")
windowed_readout_state = _dispatching("windowed_readout_state")
associative_readout = _dispatching("associative_readout")
persistent_readout = _dispatching("persistent_readout")
store_top = _dispatching("store_top")
store_merge = _dispatching("store_merge")
innovation_scores = _dispatching("innovation_scores")

__all__ = list(PRIMITIVE_OF) + ["register_ops", "route", "library_of"]
