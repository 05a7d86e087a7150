"""Argument checks shared by the task models of both backends (no torch or JAX import)."""

from __future__ import annotations

import memcore
from memcore.spec.model import Model


def check_task_model(cls: str, spec, params, seed: int, short_conv: int) -> dict:
    """The arguments of a task model (torch ``TaskLM`` or its JAX twin): a mixer-only model
    spec and a short-convolution width >= 0; returns the parameters (``memcore.init``'s when
    none are given)."""
    if not isinstance(spec, Model):
        raise TypeError(f"spec must be a memcore model spec, got {type(spec).__name__}")
    if spec.ffn is not None:
        raise ValueError(f"{cls} builds mixer-only blocks: spec.ffn must be None, "
                         f"got {spec.ffn!r}")
    if isinstance(short_conv, bool) or not isinstance(short_conv, int) or short_conv < 0:
        raise ValueError(f"short_conv must be an int >= 0 (0: none), got {short_conv!r}")
    return memcore.init(spec, seed) if params is None else params
