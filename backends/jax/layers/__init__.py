"""The JAX layers, one module per ``spec.layer``: ``mamba``, ``windowed`` (transformer, bmojo_f,
bmojo), ``mosaic``, ``persistent``. Each exposes

    init_state(spec, batch, dtype, max_len=0)              -> state dict ("pos" included)
    forward(spec, params, x, state, *, implementation, cu_seqlens=None) -> (y, state, aux)
    step(spec, params, x_t, state)                        -> (y_t, state, aux)

``params`` is the layer's own parameter dict (unprefixed), ``x`` in the accumulation dtype,
``state["pos"]`` an int32 scalar (tokens seen), ``aux`` bmojo's innovation loss or None.
``implementation`` ("jax" or "pallas", resolved by the caller) reaches the primitives that have
a kernel. ``cu_seqlens`` (checked int32 [N + 1], possibly traced; batch 1, the empty state): a
packed row, each document run as if alone; the state returned is the last document's
(``packed.py`` holds the windowed and mosaic forms).
"""

from __future__ import annotations

import importlib

NAMES = ("mamba", "windowed", "mosaic", "persistent")


def module(spec):
    """The layers/ module realizing a layer spec (by ``spec.layer``; imported on first use, so
    the layer modules can import ``sub`` from here)."""
    name = getattr(spec, "layer", None)
    if name not in NAMES:
        raise TypeError(f"spec must be a memcore layer spec, got {spec!r}")
    return importlib.import_module(f"{__name__}.{name}")


def sub(p: dict, prefix: str) -> dict:
    """The entries of ``p`` under ``prefix``, the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}
