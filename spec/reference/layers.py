"""Realization-level reference: ``forward`` (parallel) and ``step`` (streaming) for every layer
spec, with input and state validation.

A state is a dict: ``pos`` (tokens seen so far, an int), ``spec_id`` (the spec's fingerprint) and
named arrays (see each layer's module). Arrays are kept in the accumulation dtype (float32,
float64 for float64 inputs).
"""

from __future__ import annotations

from ..layers import mixer_family
from ..params import check_params
from ..validate import check_layer_input
from . import mamba, mosaic, windowed
from ._xp import acc_dtype, cast_out, namespace, params_as

META = ("pos", "spec_id")


def _arrays(xp, spec, batch: int, dtype, like):
    kind = mixer_family(spec)
    if kind == "windowed":
        return windowed.init_state(xp, spec, batch, dtype, like)
    if kind == "mamba":
        return mamba.init_state(xp, spec, batch, dtype, like)
    if kind == "mosaic":
        return mosaic.init_state(xp, spec, batch, dtype, like)
    return mosaic.persistent_init_state(xp, spec, batch, dtype, like)


def init_state(spec, batch: int, like):
    """The state before any token: ``like`` is an array whose namespace, device and dtype
    (through its accumulation dtype) the state takes."""
    xp = namespace(like)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"init_state: batch must be a positive int, got {batch!r}")
    state = {"pos": 0, "spec_id": spec.spec_id}
    state.update(_arrays(xp, spec, batch, acc_dtype(xp, like.dtype), like))
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
    want = _arrays(xp, spec, batch, acc_dtype(xp, dtype), probe)
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


def _prepare(spec, params, x, state, streaming: bool, name: str):
    check_layer_input(spec, x, streaming=streaming, name=name)
    xp = namespace(x)
    check_params(spec, params)
    acc = acc_dtype(xp, x.dtype)
    xa = x if x.dtype == acc else xp.astype(x, acc)
    p = params_as(xp, params, xa)
    if state is None:
        state = init_state(spec, x.shape[0], x)
    else:
        check_state(spec, state, x.shape[0], xp, x.dtype)
    arrays = {k: v for k, v in state.items() if k not in META}
    return xp, xa, p, state["pos"], arrays


def _finish(xp, spec, y, arrays, pos: int, dtype):
    new = {"pos": pos, "spec_id": spec.spec_id}
    new.update(arrays)
    return cast_out(xp, y, dtype), new


def forward_aux(spec, params, x, state=None):
    """Parallel form: x [B, T, D] -> (y [B, T, D], final state, aux). ``aux`` is bmojo's
    innovation loss (mean score of this call's tokens), None for other layers."""
    xp, xa, p, pos, arrays = _prepare(spec, params, x, state, False, "x")
    kind = mixer_family(spec)
    aux = None
    if kind == "windowed":
        y, arrays, aux = windowed.forward(xp, spec, p, xa, arrays, pos)
    elif kind == "mamba":
        y, arrays = mamba.forward(xp, spec, p, xa, arrays)
    elif kind == "mosaic":
        y, arrays = mosaic.forward(xp, spec, p, xa, arrays, pos)
    else:
        y, arrays = mosaic.persistent_forward(xp, spec, p, xa, arrays)
    y, new = _finish(xp, spec, y, arrays, pos + x.shape[1], x.dtype)
    return y, new, aux


def step_aux(spec, params, x_t, state=None):
    """Streaming form: x_t [B, D] -> (y_t [B, D], state, aux)."""
    xp, xa, p, pos, arrays = _prepare(spec, params, x_t, state, True, "x_t")
    kind = mixer_family(spec)
    aux = None
    if kind == "windowed":
        y, arrays, aux = windowed.step(xp, spec, p, xa, arrays, pos)
    elif kind == "mamba":
        y, arrays = mamba.step(xp, spec, p, xa, arrays)
    elif kind == "mosaic":
        y, arrays = mosaic.step(xp, spec, p, xa, arrays, pos)
    else:
        y, arrays = mosaic.persistent_step(xp, spec, p, xa, arrays)
    y, new = _finish(xp, spec, y, arrays, pos + 1, x_t.dtype)
    return y, new, aux


def forward(spec, params, x, state=None):
    y, state, _ = forward_aux(spec, params, x, state)
    return y, state


def step(spec, params, x_t, state=None):
    y, state, _ = step_aux(spec, params, x_t, state)
    return y, state


__all__ = ["forward", "step", "forward_aux", "step_aux", "init_state", "check_state"]
