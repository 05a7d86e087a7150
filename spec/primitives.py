"""Specs of the primitives of DESIGN section 2. Layer specs build them (see ``layers.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from .arguments import bool_arg, choice_arg, int_arg
from .base import Spec

POSITIONS = ("rope", "none")


@dataclass(frozen=True)
class SelectiveScanSpec(Spec):
    """2.1: h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t ; y_t = C_t . h_t + D u_t."""

    kind = "selective_scan"
    d_inner: int
    d_state: int

    def _validate(self):
        int_arg("SelectiveScanSpec", "d_inner", self.d_inner, minimum=1)
        int_arg("SelectiveScanSpec", "d_state", self.d_state, minimum=1)


@dataclass(frozen=True)
class LeakyAverageSpec(Spec):
    """2.2: kbar_t = ktilde_t + exp(-10 |p_h|) kbar_{t-1}, per head."""

    kind = "leaky_average"
    n_heads: int
    head_dim: int

    def _validate(self):
        int_arg("LeakyAverageSpec", "n_heads", self.n_heads, minimum=1)
        int_arg("LeakyAverageSpec", "head_dim", self.head_dim, minimum=1)


@dataclass(frozen=True)
class EideticStoreSpec(Spec):
    """2.4: per chunk keep the ``select`` best scores; the store keeps the ``capacity`` best."""

    kind = "eidetic_store"
    chunk: int
    select: int
    capacity: int
    window: int

    def _validate(self):
        int_arg("EideticStoreSpec", "chunk", self.chunk, minimum=1)
        int_arg("EideticStoreSpec", "select", self.select, minimum=0, maximum=self.chunk)
        int_arg("EideticStoreSpec", "capacity", self.capacity, minimum=0)
        int_arg("EideticStoreSpec", "window", self.window, minimum=1)


@dataclass(frozen=True)
class WindowedReadoutSpec(Spec):
    """2.3: one softmax over the raw window, the fading window and the visible store."""

    kind = "windowed_readout"
    n_heads: int
    head_dim: int
    window: int | None
    positions: str = "rope"
    fading: bool = False
    store: EideticStoreSpec | None = None

    def _validate(self):
        int_arg("WindowedReadoutSpec", "n_heads", self.n_heads, minimum=1)
        int_arg("WindowedReadoutSpec", "head_dim", self.head_dim, minimum=1)
        int_arg("WindowedReadoutSpec", "window", self.window, minimum=1, allow_none=True)
        choice_arg("WindowedReadoutSpec", "positions", self.positions, POSITIONS)
        bool_arg("WindowedReadoutSpec", "fading", self.fading)
        if (self.fading or self.store is not None) and self.window is None:
            raise ValueError("WindowedReadoutSpec: window must be an int when fading or a store "
                             "is used (both sources sit behind the window), got None")


@dataclass(frozen=True)
class AssociativeReadoutSpec(Spec):
    """2.5: y_t = sum_{j<t} softmax_j(k_t . k_j) v_j; ``capacity`` keeps the newest pairs."""

    kind = "associative_readout"
    n_heads: int
    head_dim: int
    capacity: int | None = None

    def _validate(self):
        int_arg("AssociativeReadoutSpec", "n_heads", self.n_heads, minimum=1)
        int_arg("AssociativeReadoutSpec", "head_dim", self.head_dim, minimum=1)
        int_arg("AssociativeReadoutSpec", "capacity", self.capacity, minimum=1, allow_none=True)


@dataclass(frozen=True)
class PersistentReadoutSpec(Spec):
    """2.6: y_t = softmax(k_t Mk^T) Mv with ``slots`` learned key/value pairs per head."""

    kind = "persistent_readout"
    n_heads: int
    head_dim: int
    slots: int

    def _validate(self):
        int_arg("PersistentReadoutSpec", "n_heads", self.n_heads, minimum=1)
        int_arg("PersistentReadoutSpec", "head_dim", self.head_dim, minimum=1)
        int_arg("PersistentReadoutSpec", "slots", self.slots, minimum=1)
