"""Realization-level reference: ``forward`` (parallel) and ``step`` (streaming) for every layer
spec, with input and state validation.

Each layer module (``mamba``, ``windowed``, ``mosaic``, ``persistent``; ``spec.layer`` names it)
has ``init_state(spec, batch, like)``, ``forward(spec, params, x, state) -> (y, state, aux)`` and
``step(spec, params, x_t, state) -> (y_t, state, aux)`` on checked inputs in the accumulation
dtype. The entry points here check inputs, parameters and states and add ``spec_id``.

A state is a dict: ``pos`` (tokens seen so far, an int), ``spec_id`` (the spec's fingerprint) and
named arrays (see each layer's module). Arrays are kept in the accumulation dtype (float32,
float64 for float64 inputs).
"""

from __future__ import annotations

from ...params import check_params
from ...validate import check_layer_input
from ..numerics import acc_dtype, cast_out, device, namespace, params_as
from ..packed import check_cu_seqlens
from . import mamba, mosaic, persistent, windowed

META = ("pos", "spec_id")
MODULES = {"mamba": mamba, "windowed": windowed, "mosaic": mosaic, "persistent": persistent}


def layer_module(spec):
    """The module of this tree that realizes ``spec`` (looked up by ``spec.layer``)."""
    module = MODULES.get(getattr(spec, "layer", None))
    if module is None:
        raise TypeError(f"spec must be a memcore layer spec, got {spec!r}")
    return module


def state_arrays(xp, spec, batch: int, dtype, like):
    """The arrays of the state before any token (no ``pos``, no ``spec_id``), of ``dtype`` in
    namespace ``xp`` on ``like``'s device."""
    probe = xp.zeros((1,), dtype=dtype, device=device(like))
    arrays = layer_module(spec).init_state(spec, batch, probe)
    return {k: a for k, a in arrays.items() if k not in META}


def init_state(spec, batch: int, like):
    """The state before any token: ``like`` is an array whose namespace, device and dtype
    (through its accumulation dtype) the state takes."""
    xp = namespace(like)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"init_state: batch must be a positive int, got {batch!r}")
    state = {"pos": 0, "spec_id": spec.spec_id}
    state.update(state_arrays(xp, spec, batch, acc_dtype(xp, like.dtype), like))
    return state


def check_state(spec, state, batch: int, xp, dtype, name: str = "state") -> None:
    """Raise a ValueError naming what in ``state`` does not fit ``spec`` and this input."""
    if not isinstance(state, dict) or "spec_id" not in state or "pos" not in state:
        raise ValueError(f"{name} must be a memcore state dict (from init_state or a previous "
                         f"call), got {type(state).__name__}")
    if state["spec_id"] != spec.spec_id:
        raise ValueError(f"{name} was made for another spec (spec_id {state['spec_id']!r}); "
                         f"this {spec.kind} layer has spec_id {spec.spec_id!r}")
    pos = state["pos"]
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
        raise ValueError(f"{name}['pos'] must be a non-negative int, got {pos!r}")
    probe = xp.zeros((1,), dtype=dtype)
    want = state_arrays(xp, spec, batch, acc_dtype(xp, dtype), probe)
    keys = set(state) - set(META)
    if keys != set(want):
        raise ValueError(f"{name} has arrays {sorted(keys)}; the {spec.kind} spec expects "
                         f"{sorted(want)}")
    for key, ref in want.items():
        got = state[key]
        shape, ref_shape = tuple(got.shape), tuple(ref.shape)
        grows = (key in ("k", "v") and getattr(spec, "window", 0) is None) or (
            key in ("mem_k", "mem_v") and getattr(spec, "capacity", 0) is None)
        if grows:  # a KV cache holds every token seen (k, v) or every completed pair (mem_*)
            held = pos if key in ("k", "v") else max(pos - 1, 0)
            ref_shape = ref_shape[:2] + (held,) + ref_shape[3:]
        if shape != ref_shape:
            raise ValueError(f"{name}[{key!r}] has shape {shape}, expected {ref_shape} "
                             f"(batch {batch})")
        if got.dtype != ref.dtype:
            raise ValueError(f"{name}[{key!r}] has dtype {got.dtype}, expected {ref.dtype} "
                             f"(the accumulation dtype of a {dtype} input; make the state with "
                             f"init_state(batch, like=x))")


def _run(spec, params, x, state, streaming: bool, cu_seqlens=None):
    check_layer_input(spec, x, streaming=streaming, name="x_t" if streaming else "x")
    module = layer_module(spec)
    xp = namespace(x)
    bounds = None if streaming else check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0], state)
    check_params(spec, params)
    acc = acc_dtype(xp, x.dtype)
    xa = x if x.dtype == acc else xp.astype(x, acc)
    p = params_as(xp, params, xa)
    if state is None:
        state = init_state(spec, x.shape[0], x)
    else:
        check_state(spec, state, x.shape[0], xp, x.dtype)
    inner = {k: v for k, v in state.items() if k != "spec_id"}
    if bounds is not None:
        y, inner, aux = module.forward(spec, p, xa, inner, bounds)
    else:
        y, inner, aux = (module.step if streaming else module.forward)(spec, p, xa, inner)
    new = {"pos": inner["pos"], "spec_id": spec.spec_id}
    new.update({k: v for k, v in inner.items() if k != "pos"})
    return cast_out(xp, y, x.dtype), new, aux


def forward_aux(spec, params, x, state=None, cu_seqlens=None):
    """Parallel form: x [B, T, D] -> (y [B, T, D], final state, aux). ``aux`` is bmojo's
    innovation loss (mean score of this call's tokens), None for other layers.
    ``cu_seqlens`` (int32 [N + 1], B = 1, state None; see ``reference.packed``): each
    document runs as if alone from the empty state; the state is the last document's."""
    return _run(spec, params, x, state, streaming=False, cu_seqlens=cu_seqlens)


def step_aux(spec, params, x_t, state=None):
    """Streaming form: x_t [B, D] -> (y_t [B, D], state, aux)."""
    return _run(spec, params, x_t, state, streaming=True)


def forward(spec, params, x, state=None, cu_seqlens=None):
    y, state, _ = forward_aux(spec, params, x, state, cu_seqlens)
    return y, state


def step(spec, params, x_t, state=None):
    y, state, _ = step_aux(spec, params, x_t, state)
    return y, state


__all__ = ["forward", "step", "forward_aux", "step_aux", "init_state", "check_state",
           "state_arrays", "layer_module", "META", "MODULES"]
