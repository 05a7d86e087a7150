"""memcore.spec: spec dataclasses, their constructors, and the Array API reference.

Constructors follow DESIGN section 3::

    memcore.spec.transformer(d_model, n_heads, window=None, positions="rope")
    memcore.spec.mamba(d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto")
    memcore.spec.bmojo_f(d_model, n_heads, window, d_state=16, positions="rope",
                         tie_fading=True, fading=True)
    memcore.spec.bmojo(d_model, n_heads, window, chunk, select, capacity, d_state=16, ...)
    memcore.spec.mosaic(d_model, n_heads, capacity=None)
    memcore.spec.persistent(d_model, n_heads, slots)
    memcore.spec.model(layers, vocab_size, ffn="mlp", ...)
    memcore.spec.jamba(d_model, n_heads, pattern="MMMA", n_layers=None, vocab_size=256)
"""

from __future__ import annotations

from .base import Spec, from_dict, from_json
from .constants import ROPE_BASE
from .layers import LAYER_KINDS, BMojo, BMojoF, Mamba, Mosaic, Persistent, Transformer
from .model import Model, jamba, model
from .primitives import (
    AssociativeReadoutSpec,
    EideticStoreSpec,
    LeakyAverageSpec,
    PersistentReadoutSpec,
    SelectiveScanSpec,
    WindowedReadoutSpec,
)


def transformer(d_model: int, n_heads: int, window: int | None = None,
                positions: str = "rope", n_kv_heads: int | None = None,
                rope_theta: float = ROPE_BASE) -> Transformer:
    return Transformer(d_model, n_heads, window, positions, n_kv_heads=n_kv_heads,
                       rope_theta=rope_theta)


def mamba(d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
          dt_rank: int | str = "auto", inner_norm_eps: float | None = None) -> Mamba:
    return Mamba(d_model, d_state, d_conv, expand, dt_rank, inner_norm_eps=inner_norm_eps)


def bmojo_f(d_model: int, n_heads: int, window: int, d_state: int = 16, positions: str = "rope",
            tie_fading: bool = True, fading: bool = True, d_conv: int = 4, expand: int = 2,
            dt_rank: int | str = "auto") -> BMojoF:
    return BMojoF(d_model, n_heads, window, d_state, positions, tie_fading, fading, d_conv,
                  expand, dt_rank)


def bmojo(d_model: int, n_heads: int, window: int, chunk: int, select: int, capacity: int,
          d_state: int = 16, positions: str = "rope", tie_fading: bool = True,
          fading: bool = True, d_conv: int = 4, expand: int = 2,
          dt_rank: int | str = "auto") -> BMojo:
    return BMojo(d_model, n_heads, window, d_state, positions, tie_fading, fading, d_conv,
                 expand, dt_rank, chunk=chunk, select=select, capacity=capacity)


def mosaic(d_model: int, n_heads: int, capacity: int | None = None) -> Mosaic:
    return Mosaic(d_model, n_heads, capacity)


def persistent(d_model: int, n_heads: int, slots: int) -> Persistent:
    return Persistent(d_model, n_heads, slots)


__all__ = [
    "Spec", "from_dict", "from_json", "LAYER_KINDS",
    "Transformer", "Mamba", "BMojoF", "BMojo", "Mosaic", "Persistent", "Model",
    "transformer", "mamba", "bmojo_f", "bmojo", "mosaic", "persistent", "model", "jamba",
    "SelectiveScanSpec", "LeakyAverageSpec", "WindowedReadoutSpec", "EideticStoreSpec",
    "AssociativeReadoutSpec", "PersistentReadoutSpec",
]
