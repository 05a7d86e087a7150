"""Packed sequences (DESIGN 5a) on JAX: ``cu_seqlens`` int32 [N + 1] as an array whose length
(the number of documents) is static and whose boundaries may be traced, so one compiled
computation serves every packing of T tokens into N documents.

``check_cu_seqlens`` validates what it can see: outside jit every check of the reference
(``memcore.spec.reference.packed``); under jit, where the boundaries are tracers, only the
static ones (dtype, shape, batch 1, no state). The per-token arrays the packed paths mask with
are computed from the boundaries with array ops, never read on the host.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from memcore.spec.reference.packed import check_cu_seqlens as _check_values

from .numerics import POS_DTYPE, is_traced

__all__ = ["check_cu_seqlens", "segment_ids", "doc_positions", "last_start", "to_slots",
           "max_chunk", "PACKED_STORE_UNSERVED"]

# Why a packed readout with a store takes no Pallas kernel (``implementation.choose``'s
# ``unserved``): the kernel masks the windows to each document but, like the Triton kernel,
# takes no store snapshots laid out on a packed row's chunks; ``auto`` runs plain JAX.
PACKED_STORE_UNSERVED = ("the Pallas readout takes no store source in a packed row "
                         "(cu_seqlens); it runs on JAX")


def check_cu_seqlens(cu_seqlens, T: int, batch: int, state=None, where: str = "forward"):
    """``cu_seqlens`` as an int32 JAX array [N + 1], or None for an unpacked call. Raises a
    ValueError naming ``cu_seqlens`` when it cannot describe N >= 1 non-empty documents
    covering the T tokens of a row of ``batch`` 1 started from ``state`` None."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, (list, tuple)) or not hasattr(cu_seqlens, "dtype"):
        raise ValueError(f"{where}: cu_seqlens must be an int32 array [N + 1], got "
                         f"{type(cu_seqlens).__name__}")
    if not is_traced(cu_seqlens):
        _check_values(np.asarray(cu_seqlens), T, batch, state, where)
        return jnp.asarray(cu_seqlens)
    # Traced: the boundaries are unknown here, so only what the shapes say is checked.
    if jnp.dtype(cu_seqlens.dtype) != jnp.int32:
        raise ValueError(f"{where}: cu_seqlens must have dtype int32, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{where}: cu_seqlens must be 1-D [N + 1] with N >= 1 documents, got "
                         f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.shape[0] - 1 > T:
        raise ValueError(f"{where}: cu_seqlens holds {cu_seqlens.shape[0] - 1} documents, more "
                         f"than the T={T} tokens (every document holds at least one)")
    if batch != 1:
        raise ValueError(f"{where}: cu_seqlens packs documents into one row: the input must "
                         f"have batch 1, got batch {batch}")
    if state is not None:
        raise ValueError(f"{where}: cu_seqlens starts every document from the empty state; "
                         f"pass state=None (initial_state=None) with it")
    return cu_seqlens


def segment_ids(cu, T: int):
    """The document of each position: int32 [T] (searchsorted over the documents' ends)."""
    return jnp.searchsorted(cu[1:], jnp.arange(T, dtype=cu.dtype), side="right").astype(
        POS_DTYPE)


def doc_positions(cu, T: int):
    """Each position counted from its document's first token: int32 [T]."""
    t = jnp.arange(T, dtype=POS_DTYPE)
    return t - cu[segment_ids(cu, T)].astype(POS_DTYPE)


def last_start(cu):
    """The first position of the last document (0-d int32): its length is T - this."""
    return cu[-2].astype(POS_DTYPE)


def to_slots(seq, start, n, slots: int):
    """A growing cache of ``slots`` slots holding entries start .. start + n - 1 of ``seq``
    [B, H, T, E] in slots 0 .. n - 1, zeros after (start, n may be traced)."""
    s = jnp.arange(slots)
    got = jnp.take(seq, jnp.clip(start + s, 0, seq.shape[2] - 1), axis=2)
    return jnp.where((s < n)[None, None, :, None], got, jnp.zeros((), seq.dtype))


def max_chunk(spec) -> int:
    """The longest store chunk of a layer or model spec (0 without a store)."""
    layers = getattr(spec, "layers", (spec,))
    return max([s.readout.store.chunk for s in layers
                if getattr(getattr(s, "readout", None), "store", None) is not None], default=0)
