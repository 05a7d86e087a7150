"""Specs of the primitives of DESIGN section 2. Layer specs build them (see ``layers.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from .arguments import bool_arg, choice_arg, int_arg, positive_ints
from .base import Spec

POSITIONS = ("rope", "none")


@dataclass(frozen=True)
class SelectiveScanSpec(Spec):
    """2.1: h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t ; y_t = C_t . h_t + D u_t."""

    kind = "selective_scan"
    d_inner: int
    d_state: int

    def _validate(self):
        positive_ints(type(self).__name__, self, "d_inner", "d_state")


@dataclass(frozen=True)
class HeadsSpec(Spec):
    """A primitive that works per head: ``n_heads`` heads of width ``head_dim``."""

    n_heads: int
    head_dim: int

    def _validate(self):
        positive_ints(type(self).__name__, self, "n_heads", "head_dim")


@dataclass(frozen=True)
class LeakyAverageSpec(HeadsSpec):
    """2.2: kbar_t = ktilde_t + exp(-10 |p_h|) kbar_{t-1}, per head."""

    kind = "leaky_average"


@dataclass(frozen=True)
class EideticStoreSpec(Spec):
    """2.4: per chunk keep the ``select`` best scores; the store keeps the ``capacity`` best."""

    kind = "eidetic_store"
    chunk: int
    select: int
    capacity: int
    window: int

    def _validate(self):
        owner = type(self).__name__
        positive_ints(owner, self, "chunk", "window")
        int_arg(owner, "select", self.select, minimum=0, maximum=self.chunk)
        int_arg(owner, "capacity", self.capacity, minimum=0)


@dataclass(frozen=True)
class WindowedReadoutSpec(HeadsSpec):
    """2.3: one softmax over the raw window, the fading window and the visible store."""

    kind = "windowed_readout"
    window: int | None
    positions: str = "rope"
    fading: bool = False
    store: EideticStoreSpec | None = None

    def _validate(self):
        super()._validate()
        owner = type(self).__name__
        positive_ints(owner, self, "window", allow_none=("window",))
        choice_arg(owner, "positions", self.positions, POSITIONS)
        bool_arg(owner, "fading", self.fading)
        if (self.fading or self.store is not None) and self.window is None:
            raise ValueError(f"{owner}: window must be an int when fading or a store is used "
                             f"(both sources sit behind the window), got None")


@dataclass(frozen=True)
class AssociativeReadoutSpec(HeadsSpec):
    """2.5: y_t = sum_{j<t} softmax_j(k_t . k_j) v_j; ``capacity`` keeps the newest pairs."""

    kind = "associative_readout"
    capacity: int | None = None

    def _validate(self):
        super()._validate()
        positive_ints(type(self).__name__, self, "capacity", allow_none=("capacity",))


@dataclass(frozen=True)
class PersistentReadoutSpec(HeadsSpec):
    """2.6: y_t = softmax(k_t Mk^T) Mv with ``slots`` learned key/value pairs per head."""

    kind = "persistent_readout"
    slots: int

    def _validate(self):
        super()._validate()
        positive_ints(type(self).__name__, self, "slots")
