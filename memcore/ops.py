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
import inspect

import array_api_compat

from memcore.spec import validate

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
        return validate.library(a)
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


# Op -> (its array arguments, those of them that may be None). Every array of one call must
# come from one library; the trees' own checks (memcore.spec.validate) then read shapes and
# dtypes. Checked here, before routing picks a tree, so that a list, None or a mix of
# libraries is named, whichever tree the call would reach.
ARRAYS = {
    "selective_scan": (("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"),
                       ("D", "z", "delta_bias", "initial_state")),
    "selective_state_update": (("state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
                               ("D", "z", "delta_bias")),
    "leaky_average": (("k", "log_decay", "initial_state"), ("initial_state",)),
    "leaky_average_step": (("k_t", "log_decay", "state"), ()),
    "windowed_readout": (("q", "k", "v", "fading_k", "fading_v"), ("fading_k", "fading_v")),
    "windowed_readout_step": (("q_t", "k_t", "v_t", "fading_k_t", "fading_v_t"),
                              ("fading_k_t", "fading_v_t")),
    "windowed_readout_state": (("q",), ()),
    "associative_readout": (("k", "v"), ()),
    "persistent_readout": (("k", "mem_k", "mem_v"), ()),
    "innovation_scores": (("x", "s_prev", "pred_weight"), ("s_prev", "pred_weight")),
    "store_top": ((), ()),
    "store_merge": ((), ()),
}
# Op -> its integer arguments: (name, minimum, None allowed).
COUNTS = {
    "windowed_readout": (("window", 1, True),),
    "windowed_readout_step": (("window", 1, True),),
    "windowed_readout_state": (("window", 1, True),),
    "associative_readout": (("capacity", 1, True),),
    "store_top": (("n", 0, False),),
    "store_merge": (("n", 0, False),),
}
FLAGS = {
    "selective_scan": ("delta_softplus", "return_final_state"),
    "selective_state_update": ("delta_softplus",),
    "leaky_average": ("return_final_state",),
    "windowed_readout": ("return_final_state",),
    "windowed_readout_state": ("fading",),
}
ENTRIES = {"store_top": ("entries",), "store_merge": ("a", "b")}


@functools.cache
def _signature(fn):
    return inspect.signature(fn)


def check_call(name: str, fn, args, kwargs) -> None:
    """The checks every tree shares for a call of op ``name`` (routed to ``fn``)."""
    try:
        bound = _signature(fn).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    given = bound.arguments
    arrays, optional = ARRAYS[name]
    params = _signature(fn).parameters
    validate.check_arrays(name, {a: given.get(a) for a in arrays if a in params},
                          optional=optional)
    for arg, minimum, allow_none in COUNTS.get(name, ()):
        if arg in given:
            validate.check_count(name, arg, given[arg], minimum=minimum, allow_none=allow_none)
    for arg in FLAGS.get(name, ()):
        if arg in given and not isinstance(given[arg], bool):
            raise TypeError(f"{name}: {arg} must be a bool, got {given[arg]!r}")
    for arg in ENTRIES.get(name, ()):
        validate.check_store_entries(name, arg, given.get(arg))
    if name == "store_merge":
        a, b = given["a"]["k"], given["b"]["k"]
        if validate.library(a) != validate.library(b):
            raise TypeError(f"store_merge: a is a {validate.library(a)} entry set but b is a "
                            f"{validate.library(b)} one; pass both from one library")
        if tuple(a.shape[:2]) + (a.shape[3],) != tuple(b.shape[:2]) + (b.shape[3],):
            raise ValueError(f"store_merge: a['k'] {tuple(a.shape)} and b['k'] "
                             f"{tuple(b.shape)} must agree in batch, heads and head_dim")
    if name == "innovation_scores":
        validate.check_innovation_args(given["x"], given.get("s_prev"), given.get("pred_weight"))
    if name == "windowed_readout_state":
        q = given["q"]
        if q.ndim < 3:
            raise ValueError(f"windowed_readout_state: q must be [B, (T,) H, E], got shape "
                             f"{tuple(q.shape)}")
        if given.get("fading") and given.get("window") is None:
            raise ValueError("windowed_readout_state: window must be an int when fading=True, "
                             "got None")


def _dispatching(name: str):
    ref = route(name, "numpy")

    def op(*args, **kwargs):
        fn = route(name, library_of(args, kwargs))
        if fn is ref and "implementation" in kwargs:
            choice = kwargs.pop("implementation")
            if choice != "auto":
                raise ValueError(f"{name}: implementation={choice!r} is not available for these "
                                 f"arrays; the reference has one implementation (use 'auto')")
        check_call(name, fn, args, kwargs)
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
