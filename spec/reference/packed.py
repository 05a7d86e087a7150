"""Packed sequences (DESIGN 5a): ``cu_seqlens``, the document boundaries of one packed row.

``cu_seqlens`` is an int32 array ``[N + 1]`` (flash-linear-attention's convention): 0, the end of
each document, T. It is strictly increasing: every document holds at least one token (an empty
document has no tokens to compute and no state worth returning, and a repeated boundary is
refused rather than guessed at). A packed call takes a row of batch 1 and behaves as if each
document ran alone from the empty state; the state it returns is the last document's. A
packed call starts from the empty state: an initial state together with ``cu_seqlens`` is
refused (which document it would belong to is ambiguous once documents restart).

The reference defines the semantics with segment ids and positions within documents; each
form masks with ``where`` so that a non-finite value stays inside its document.
"""

from __future__ import annotations

import numpy as np

from .numerics import device

__all__ = ["check_cu_seqlens", "boundaries", "segment_ids", "doc_positions", "doc_starts",
           "same_document", "packed_array"]


def _host(cu_seqlens):
    """``cu_seqlens`` as a numpy array (a torch tensor on any device, a JAX or numpy array)."""
    if hasattr(cu_seqlens, "detach"):  # torch: off the autograd graph and onto the host
        cu_seqlens = cu_seqlens.detach().cpu()
    try:
        return np.asarray(cu_seqlens)
    except Exception as e:  # a traced JAX array has no concrete value
        raise ValueError(f"cu_seqlens must be a concrete int32 array (its boundaries decide "
                         f"the computation), got {type(cu_seqlens).__name__}: {e}") from e


def check_cu_seqlens(cu_seqlens, T: int, batch: int, state=None, where: str = "forward"):
    """Validate ``cu_seqlens`` for a packed row of ``T`` tokens and ``batch`` rows, with the
    given initial ``state`` (must be None). Returns the boundaries as a tuple of Python ints
    (0, ..., T), or None when ``cu_seqlens`` is None (an unpacked call)."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, (list, tuple)) or not hasattr(cu_seqlens, "dtype"):
        raise ValueError(f"{where}: cu_seqlens must be an int32 array [N + 1], got "
                         f"{type(cu_seqlens).__name__}")
    cu = _host(cu_seqlens)
    if cu.dtype != np.int32:
        raise ValueError(f"{where}: cu_seqlens must have dtype int32, got {cu_seqlens.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{where}: cu_seqlens must be 1-D [N + 1] with N >= 1 documents, got "
                         f"shape {tuple(cu.shape)}")
    if batch != 1:
        raise ValueError(f"{where}: cu_seqlens packs documents into one row: the input must "
                         f"have batch 1, got batch {batch}")
    if int(cu[0]) != 0:
        raise ValueError(f"{where}: cu_seqlens must start at 0, got {int(cu[0])}")
    if int(cu[-1]) != T:
        raise ValueError(f"{where}: cu_seqlens must end at the sequence length T={T}, got "
                         f"{int(cu[-1])}")
    steps = np.diff(cu.astype(np.int64))
    if np.any(steps <= 0):
        i = int(np.argmax(steps <= 0))
        raise ValueError(f"{where}: cu_seqlens must be strictly increasing (no empty "
                         f"documents), got {int(cu[i])} then {int(cu[i + 1])} at index {i}")
    if state is not None:
        raise ValueError(f"{where}: cu_seqlens starts every document from the empty state; "
                         f"pass state=None (initial_state=None) with it")
    return tuple(int(c) for c in cu)


def boundaries(cu_seqlens):
    """The boundaries of an already checked ``cu_seqlens`` (array or tuple) as a tuple."""
    if isinstance(cu_seqlens, tuple):
        return cu_seqlens
    return tuple(int(c) for c in _host(cu_seqlens))


def per_token(bounds):
    """numpy int64 [T] each: the document of each position and its position within it."""
    seg = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    start = np.asarray(bounds[:-1], dtype=np.int64)[seg]
    return seg, np.arange(bounds[-1], dtype=np.int64) - start


def segment_ids(xp, bounds, like):
    """The document of each position: int64 [T] on ``like``'s device."""
    return xp.asarray(per_token(bounds)[0].astype(np.int64), device=device(like))


def doc_positions(xp, bounds, like):
    """Each position counted from its document's first token: int64 [T]."""
    return xp.asarray(per_token(bounds)[1], device=device(like))


def doc_starts(xp, bounds, like):
    """True at the first token of every document: bool [T]."""
    return doc_positions(xp, bounds, like) == 0


def same_document(xp, bounds, like):
    """[T, T] bool: positions t and j lie in the same document."""
    seg = segment_ids(xp, bounds, like)
    return seg[:, None] == seg[None, :]


def packed_array(bounds):
    """Checked boundaries as the int32 ``cu_seqlens`` a primitive takes (None stays None)."""
    return None if bounds is None else np.asarray(bounds, dtype=np.int32)
