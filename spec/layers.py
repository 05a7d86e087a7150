"""Layer specs (DESIGN section 3): sequence mixers mapping [B, T, D] to [B, T, D].

Each layer spec is a composition of the primitive specs of ``primitives.py``; the cached
properties (``scan``, ``fading_block``, ``readout``, ``store``, ``leaky``) build them once per
spec, and the layers of every tree read them. ``layer`` names the ``layers/`` module that
realizes the spec, the same in the reference, torch and JAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from . import primitives as P
from .arguments import bool_arg, choice_arg, divisible, float_arg, int_arg, positive_ints
from .base import Spec
from .constants import ROPE_BASE


def drop_defaults(out: dict, defaults: dict) -> dict:
    """``out`` (a spec's ``to_dict``) without the fields added since the first specs while they
    hold their default: a spec that does not use them keeps its JSON and its ``spec_id``, and
    older JSON (which lacks them) reads back to the same spec."""
    for name, default in defaults.items():
        if out.get(name, default) == default and type(out.get(name)) is type(default):
            out.pop(name, None)
    return out


@dataclass(frozen=True)
class HeadedLayer(Spec):
    """A layer of ``n_heads`` heads over ``d_model`` channels (head_dim = d_model / n_heads)."""

    d_model: int
    n_heads: int

    def _validate(self):
        positive_ints(self.kind, self, "d_model", "n_heads")
        divisible(self.kind, "n_heads", self.d_model, "d_model", self.n_heads)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class Transformer(HeadedLayer):
    """Causal softmax attention, full (window=None) or sliding-window (2.3, raw source only).

    ``n_kv_heads`` (default n_heads, must divide it): grouped-query attention, key/value head
    j serving query heads j*g .. j*g+g-1 (g = n_heads / n_kv_heads, transformers' repeat_kv);
    k_proj and v_proj are [n_kv_heads * head_dim, d_model] and the state's rings hold
    n_kv_heads heads. ``rope_theta``: the rotary base (frequencies rope_theta^(-i / half)).
    """

    kind = "transformer"
    layer = "windowed"
    window: int | None = None
    positions: str = "rope"
    n_kv_heads: int | None = None
    rope_theta: float = ROPE_BASE

    def _validate(self):
        super()._validate()
        int_arg(self.kind, "window", self.window, minimum=1, allow_none=True)
        choice_arg(self.kind, "positions", self.positions, P.POSITIONS)
        # Grouped-query attention: n_heads / n_kv_heads query heads share each key/value head.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        int_arg(self.kind, "n_kv_heads", self.n_kv_heads, minimum=1)
        divisible(self.kind, "n_kv_heads", self.n_heads, "n_heads", self.n_kv_heads)
        float_arg(self.kind, "rope_theta", self.rope_theta, positive=True)

    def to_dict(self):
        return drop_defaults(super().to_dict(), {"n_kv_heads": self.n_heads,
                                                 "rope_theta": ROPE_BASE})

    @cached_property
    def readout(self) -> P.WindowedReadoutSpec:
        return P.WindowedReadoutSpec(self.n_heads, self.head_dim, self.window, self.positions)


@dataclass(frozen=True)
class Mamba(Spec):
    """The Mamba block of mamba-ssm around the selective scan (2.1).

    ``inner_norm_eps``: None (mamba-ssm's block), or the epsilon of Jamba's RMSNorms on the
    x_proj outputs dt, B and C (weights ``dt_layernorm.weight`` [dt_rank], ``b_layernorm.weight``
    and ``c_layernorm.weight`` [d_state]), applied before dt_proj and the scan.
    """

    kind = "mamba"
    layer = "mamba"
    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    inner_norm_eps: float | None = None

    def _validate(self):
        positive_ints("mamba", self, "d_model", "d_state", "d_conv", "expand")
        if self.dt_rank != "auto":
            int_arg("mamba", "dt_rank", self.dt_rank, minimum=1)
        if self.inner_norm_eps is not None:
            float_arg("mamba", "inner_norm_eps", self.inner_norm_eps, positive=True)

    def to_dict(self):
        return drop_defaults(super().to_dict(), {"inner_norm_eps": None})

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        # mamba-ssm's rule for dt_rank="auto".
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    @cached_property
    def scan(self) -> P.SelectiveScanSpec:
        return P.SelectiveScanSpec(self.d_inner, self.d_state)


@dataclass(frozen=True)
class BMojoF(HeadedLayer):
    """B'MOJO-F: a Mamba block's output s gives the keys/values of a fading window that sits
    behind the raw window, in the same softmax."""

    kind = "bmojo_f"
    layer = "windowed"
    window: int
    d_state: int = 16
    positions: str = "rope"
    tie_fading: bool = True
    fading: bool = True
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"

    def _validate(self):
        super()._validate()
        owner = self.kind
        int_arg(owner, "window", self.window, minimum=1)
        choice_arg(owner, "positions", self.positions, P.POSITIONS)
        bool_arg(owner, "tie_fading", self.tie_fading)
        bool_arg(owner, "fading", self.fading)
        # The fading block's own checks, with this layer's name in the message.
        try:
            _ = self.fading_block
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("mamba:", f"{owner}:", 1)) from None

    @cached_property
    def fading_block(self) -> Mamba:
        return Mamba(self.d_model, self.d_state, self.d_conv, self.expand, self.dt_rank)

    @cached_property
    def store(self) -> P.EideticStoreSpec | None:
        return None

    @cached_property
    def readout(self) -> P.WindowedReadoutSpec:
        return P.WindowedReadoutSpec(self.n_heads, self.head_dim, self.window, self.positions,
                                     fading=self.fading, store=self.store)


@dataclass(frozen=True)
class BMojo(BMojoF):
    """B'MOJO: B'MOJO-F plus an eidetic store of tokens chosen by an innovation test (2.4)."""

    kind = "bmojo"
    # Defaults only so the dataclass can extend BMojoF; the constructor requires them.
    chunk: int = 0
    select: int = 0
    capacity: int = 0

    def _validate(self):
        super()._validate()
        int_arg(self.kind, "chunk", self.chunk, minimum=1)
        int_arg(self.kind, "select", self.select, minimum=0, maximum=self.chunk)
        int_arg(self.kind, "capacity", self.capacity, minimum=0)

    @cached_property
    def store(self) -> P.EideticStoreSpec:
        return P.EideticStoreSpec(self.chunk, self.select, self.capacity, self.window)


@dataclass(frozen=True)
class LeakyKeyLayer(HeadedLayer):
    """A Memory Mosaics layer: keys from a leaky average (2.2) of the input, per head."""

    @cached_property
    def leaky(self) -> P.LeakyAverageSpec:
        return P.LeakyAverageSpec(self.n_heads, self.head_dim)


@dataclass(frozen=True)
class Mosaic(LeakyKeyLayer):
    """Memory Mosaics' contextual memory (2.5): associative readout with leaky-average keys."""

    kind = "mosaic"
    layer = "mosaic"
    capacity: int | None = None

    def _validate(self):
        super()._validate()
        int_arg(self.kind, "capacity", self.capacity, minimum=1, allow_none=True)

    @cached_property
    def readout(self) -> P.AssociativeReadoutSpec:
        return P.AssociativeReadoutSpec(self.n_heads, self.head_dim, self.capacity)


@dataclass(frozen=True)
class Persistent(LeakyKeyLayer):
    """Memory Mosaics' persistent memory (2.6): learned key/value slots, replaces the FFN."""

    kind = "persistent"
    layer = "persistent"
    slots: int

    def _validate(self):
        super()._validate()
        int_arg(self.kind, "slots", self.slots, minimum=1)

    @cached_property
    def readout(self) -> P.PersistentReadoutSpec:
        return P.PersistentReadoutSpec(self.n_heads, self.head_dim, self.slots)


LAYER_KINDS = (Transformer, Mamba, BMojoF, BMojo, Mosaic, Persistent)
