"""The layers of section 3 in torch, one module per ``spec.layer``: each has
``init_state(spec, batch, *, dtype, device)``, ``forward(spec, params, x, state) -> (y, state,
aux)`` and ``step(spec, params, x_t, state, *, inplace=False) -> (y_t, state, aux)``, on
inputs and parameters in the accumulation dtype; states are the layer's arrays plus ``pos``."""

from __future__ import annotations

from . import mamba, mosaic, persistent, windowed

MODULES = {"mamba": mamba, "windowed": windowed, "mosaic": mosaic, "persistent": persistent}


def module(spec):
    """The layer module that realizes ``spec`` (by ``spec.layer``)."""
    try:
        return MODULES[spec.layer]
    except (AttributeError, KeyError):
        raise TypeError(f"spec must be a memcore layer spec, got {spec!r}") from None


def init_state(spec, batch: int, *, dtype, device) -> dict:
    """A layer's state before any token, arrays in ``dtype`` (the accumulation dtype), tagged
    with the spec's id."""
    state = module(spec).init_state(spec, batch, dtype=dtype, device=device)
    return {"pos": 0, "spec_id": spec.spec_id, **{k: v for k, v in state.items() if k != "pos"}}
