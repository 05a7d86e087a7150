"""Fixed-shape streaming states, their validation, regrowth, and conversion to and from the
reference's state dicts (``memcore.spec.reference.layers``).

A ``State`` is an equinox module: ``pos`` a 0-d int32 array (so a jitted ``step`` compiles
once and ``lax.scan`` can carry it), ``arrays`` a dict of arrays (a model's holds ``layers``
and optionally ``ffn``, tuples of layer dicts), ``spec_id`` a static string, and ``growable``
(static): whether a growing cache (transformer with window=None, mosaic with capacity=None) may
be regrown outside jit when a call needs more room. States the realized modules build for a
call without one, and ``init_state()`` without ``max_len``, are growable;
``init_state(max_len=n)`` fixes the room at n slots, which a jitted loop over ``step`` needs.
To differentiate with respect to a state, differentiate its float arrays (``pos`` and the
store positions are integers), or use ``equinox.filter_grad``.
"""

from __future__ import annotations

import array_api_compat
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from memcore.spec.layers import Mosaic, Persistent, Transformer
from memcore.spec.model import Model
from memcore.spec.sizes import check_allocation

from . import model
from .layers import module
from .numerics import POS_DTYPE, acc_dtype, is_traced
from .rings import grow


class State(eqx.Module, strict=True):
    """A streaming state: ``state.pos`` (tokens seen), ``state[name]`` (an array)."""

    pos: jax.Array
    arrays: dict
    spec_id: str = eqx.field(static=True)
    growable: bool = eqx.field(static=True, default=False)

    def __getitem__(self, key):
        return self.arrays[key]


def grows(spec) -> bool:
    """Whether the state holds a cache whose length is the stream's (needs ``max_len``)."""
    return (isinstance(spec, Transformer) and spec.window is None) or (
        isinstance(spec, Mosaic) and spec.capacity is None)


def _grow_keys(spec):
    if not grows(spec):
        return ()
    return ("k", "v") if isinstance(spec, Transformer) else ("mem_k", "mem_v")


def layer_arrays(spec, batch: int, dtype, max_len: int) -> dict:
    st = module(spec).init_state(spec, batch, dtype, max_len)
    return {k: v for k, v in st.items() if k != "pos"}


def needs_max_len(spec) -> bool:
    if isinstance(spec, Model):
        return any(grows(layer) for layer in spec.layers)
    return grows(spec)


def _check_batch_len(batch, max_len, spec):
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"init_state: batch must be a positive int, got {batch!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(
            max_len, (int, np.integer)) or max_len < 1):
        raise ValueError(f"init_state: max_len must be a positive int or None, got {max_len!r}")


def floating_dtype(where: str, dtype):
    """``dtype`` if it is a floating dtype; else a TypeError naming ``where``'s argument."""
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{where}: dtype must be a floating dtype, got {dtype!r}")
    return dtype


def _check_size(spec, batch: int, max_len, acc) -> None:
    """The allocation limit, before the arrays exist (store positions are POS_DTYPE)."""
    check_allocation(spec, what="state", batch=int(batch),
                     max_len=None if max_len is None else int(max_len),
                     dtype_bytes=jnp.dtype(acc).itemsize, index_bytes=jnp.dtype(POS_DTYPE).itemsize)


def init_state(spec, batch: int, max_len: int | None = None, dtype=None,
               growable: bool | None = None) -> State:
    """The empty state; arrays in the accumulation dtype of ``dtype`` (default: JAX's default
    float, float64 with x64 on). A growing cache gets ``max_len`` slots and keeps them (a
    jitted loop over ``step`` needs fixed shapes); without ``max_len`` it starts empty and is
    regrown outside jit as calls need room (``growable``, which defaults to that)."""
    _check_batch_len(batch, max_len, spec)
    if growable is None:
        growable = max_len is None
    acc = acc_dtype(floating_dtype("init_state", jnp.zeros(()).dtype if dtype is None else dtype))
    _check_size(spec, batch, max_len, acc)
    n = 0 if max_len is None else int(max_len)
    if isinstance(spec, Model):
        arrays = model.init_state(spec, batch, acc, n)
        del arrays["pos"]
    else:
        arrays = layer_arrays(spec, batch, acc, n)
    return State(jnp.zeros((), POS_DTYPE), arrays, spec.spec_id, growable)


def check_state(spec, state, batch: int, dtype, name: str = "state") -> None:
    """Raise a ValueError naming what in ``state`` does not fit ``spec`` and the input."""
    if not isinstance(state, State):
        raise TypeError(f"{name} must be a memcore JAX State (from init_state or a previous "
                        f"call), got {type(state).__name__}; convert a reference state with "
                        f"from_reference_state")
    if state.spec_id != spec.spec_id:
        raise ValueError(f"{name} was made for another spec (spec_id {state.spec_id!r}); this "
                         f"{spec.kind} has spec_id {spec.spec_id!r}")
    if jnp.shape(state.pos) != () or not jnp.issubdtype(jnp.asarray(state.pos).dtype,
                                                         jnp.integer):
        raise ValueError(f"{name}.pos must be a 0-d integer array, got {state.pos!r}")
    if not is_traced(state.pos) and int(state.pos) < 0:
        raise ValueError(f"{name}.pos must be a non-negative int, got {int(state.pos)}")
    acc = acc_dtype(dtype)
    if isinstance(spec, Model):
        pairs = [(s, a, f"{name}.layers[{i}]") for i, (s, a) in
                 enumerate(zip(spec.layers, state.arrays.get("layers", ()), strict=False))]
        if len(state.arrays.get("layers", ())) != spec.n_layers:
            raise ValueError(f"{name} has {len(state.arrays.get('layers', ()))} layer states, "
                             f"expected {spec.n_layers}")
        if isinstance(spec.ffn, Persistent):
            pairs += [(spec.ffn, a, f"{name}.ffn[{i}]")
                      for i, a in enumerate(state.arrays.get("ffn", ()))]
        if spec.short_conv:
            want = (batch, spec.short_conv - 1, spec.d_model)
            conv = state.arrays.get("conv", ())
            got = [(tuple(getattr(c, "shape", ())), getattr(c, "dtype", None)) for c in conv]
            if got != [(want, jnp.dtype(acc))] * spec.n_layers:
                raise ValueError(f"{name}.conv must hold {spec.n_layers} arrays of shape {want} "
                                 f"and dtype {jnp.dtype(acc)} (each block's last short_conv - 1 "
                                 f"inputs), got {got!r:.120}")
    else:
        pairs = [(spec, state.arrays, name)]
    for s, arrays, where in pairs:
        want = layer_arrays(s, batch, acc, 0)
        if set(arrays) != set(want):
            raise ValueError(f"{where} has arrays {sorted(arrays)}; the {s.kind} spec expects "
                             f"{sorted(want)}")
        for key, ref in want.items():
            got = arrays[key]
            if not array_api_compat.is_array_api_obj(got):
                raise TypeError(f"{where}[{key!r}] must be an array, got {type(got).__name__}")
            shape, ref_shape = tuple(got.shape), tuple(ref.shape)
            if key in _grow_keys(s):
                ref_shape = ref_shape[:2] + shape[2:3] + ref_shape[3:]
            if shape != ref_shape:
                raise ValueError(f"{where}[{key!r}] has shape {shape}, expected {ref_shape} "
                                 f"(batch {batch})")
            if got.dtype != ref.dtype:
                raise ValueError(f"{where}[{key!r}] has dtype {got.dtype}, expected {ref.dtype} "
                                 f"(the accumulation dtype of a {jnp.dtype(dtype)} input)")


def _growing(spec, arrays):
    """(layer spec, its array dict, its cache keys) for every growing cache of a state."""
    if isinstance(spec, Model):
        return [(s, a, _grow_keys(s)) for s, a in zip(spec.layers, arrays["layers"], strict=True)
                if grows(s)]
    return [(spec, arrays, _grow_keys(spec))] if grows(spec) else []


def capacity_left(spec, state) -> int | None:
    """Slots of the smallest growing cache (None when nothing grows)."""
    sizes = [a[keys[0]].shape[2] for _, a, keys in _growing(spec, state.arrays)]
    return min(sizes) if sizes else None


def regrow(spec, state: State, need: int) -> State:
    """The state with every growing cache holding at least ``need`` slots (at least double its
    room, so a stream of calls regrows a logarithmic number of times). Outside jit only."""
    cap = capacity_left(spec, state)
    if cap is None or need <= cap:
        return state
    slots = max(int(need), 2 * cap)
    batch = jax.tree_util.tree_leaves(state.arrays)[0].shape[0]
    dtype = next(a.dtype for a in jax.tree_util.tree_leaves(state.arrays)
                 if jnp.issubdtype(a.dtype, jnp.floating))
    _check_size(spec, batch, slots, dtype)

    def grown(s, arrays):
        return {k: grow(a, slots) if k in _grow_keys(s) else a for k, a in arrays.items()}

    if isinstance(spec, Model):
        arrays = dict(state.arrays, layers=tuple(grown(s, a) for s, a in
                                                 zip(spec.layers, state.arrays["layers"],
                                                     strict=True)))
    else:
        arrays = grown(spec, state.arrays)
    return State(state.pos, arrays, state.spec_id, state.growable)


# --- conversion to and from the reference format -------------------------------------------

def _layer_to_ref(spec, arrays: dict, pos: int) -> dict:
    out = {"pos": pos, "spec_id": spec.spec_id}
    for key, a in arrays.items():
        a = np.asarray(a)
        if key in _grow_keys(spec):
            n = pos if isinstance(spec, Transformer) else max(pos - 1, 0)
            a = a[:, :, :n]
        if key.endswith("pos"):
            a = a.astype(np.int64)
        out[key] = a
    return out


def to_reference_state(spec, state: State) -> dict:
    """The reference's state dict: "pos" int, "spec_id", numpy arrays of the same names and
    shapes (caches cut to the tokens held)."""
    if not isinstance(state, State):
        raise TypeError(f"state must be a memcore JAX State, got {type(state).__name__}")
    if state.spec_id != spec.spec_id:
        raise ValueError(f"state was made for another spec (spec_id {state.spec_id!r}); "
                         f"expected {spec.spec_id!r}")
    pos = int(state.pos)
    if not isinstance(spec, Model):
        return _layer_to_ref(spec, state.arrays, pos)
    out = {"pos": pos, "spec_id": spec.spec_id,
           "layers": tuple(_layer_to_ref(s, a, pos)
                           for s, a in zip(spec.layers, state.arrays["layers"], strict=True))}
    if "ffn" in state.arrays:
        out["ffn"] = tuple(_layer_to_ref(spec.ffn, a, pos) for a in state.arrays["ffn"])
    if "conv" in state.arrays:
        out["conv"] = tuple(np.asarray(a) for a in state.arrays["conv"])
    return out


def _layer_from_ref(spec, ref: dict, max_len: int | None, where: str) -> dict:
    if not isinstance(ref, dict) or ref.get("spec_id") != spec.spec_id:
        got = ref.get("spec_id") if isinstance(ref, dict) else type(ref).__name__
        raise ValueError(f"{where} was made for another spec ({got!r}); expected spec_id "
                         f"{spec.spec_id!r}")
    pos = ref["pos"]
    out = {}
    for key, a in ref.items():
        if key in ("pos", "spec_id"):
            continue
        a = np.asarray(a)
        if key in _grow_keys(spec):
            n = a.shape[2]
            if max_len is None or max_len < n:
                raise ValueError(f"from_reference_state: max_len must be at least the cache "
                                 f"length {n} of {where}[{key!r}], got {max_len!r}")
            a = np.pad(a, ((0, 0), (0, 0), (0, max_len - n), (0, 0)))
        if key.endswith("pos"):
            a = a.astype(np.int32)
        out[key] = jnp.asarray(a)
    del pos
    return out


def from_reference_state(spec, ref: dict, max_len: int | None = None) -> State:
    """A ``State`` from the reference's dict; ``max_len`` sizes growing caches."""
    if not isinstance(ref, dict) or "pos" not in ref:
        raise TypeError(f"ref_state must be a reference state dict, got {type(ref).__name__}")
    if ref.get("spec_id") != spec.spec_id:
        raise ValueError(f"ref_state was made for another spec ({ref.get('spec_id')!r}); "
                         f"expected spec_id {spec.spec_id!r}")
    pos = int(ref["pos"])
    if max_len is not None and needs_max_len(spec) and pos > max_len:
        raise ValueError(f"from_reference_state: max_len={max_len} is below pos={pos}")
    if isinstance(spec, Model):
        arrays = {"layers": tuple(_layer_from_ref(s, r, max_len, f"ref_state['layers'][{i}]")
                                  for i, (s, r) in enumerate(zip(spec.layers, ref["layers"],
                                                                 strict=True)))}
        if "ffn" in ref:
            arrays["ffn"] = tuple(_layer_from_ref(spec.ffn, r, max_len, f"ref_state['ffn'][{i}]")
                                  for i, r in enumerate(ref["ffn"]))
        if "conv" in ref:
            arrays["conv"] = tuple(jnp.asarray(np.asarray(a)) for a in ref["conv"])
    else:
        arrays = _layer_from_ref(spec, ref, max_len, "ref_state")
    return State(jnp.asarray(pos, POS_DTYPE), arrays, spec.spec_id)
