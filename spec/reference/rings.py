"""Ring buffers of the streaming states (windowed readout, bounded associative memory).

A ring of ``size`` slots holds, after ``n`` tokens, position p in slot p % size for the last
``size`` positions; slot positions are derived from n, so a ring carries no position array.
"""

from __future__ import annotations

from .numerics import device, gather_rows

INT = "int64"


def seq_positions(xp, start: int, length: int, like):
    """The absolute positions start .. start + length - 1, as an int array on ``like``'s device."""
    return xp.arange(start, start + length, dtype=getattr(xp, INT), device=device(like))


def ring_positions(xp, n: int, size: int, like):
    """Position held by each slot of a ring of ``size`` after ``n`` tokens (< 0: empty)."""
    i = xp.arange(size, dtype=getattr(xp, INT), device=device(like))
    return (n - 1) - xp.remainder((n - 1) - i, size) if n > 0 else i * 0 - 1


def seq_to_ring(xp, keys, kpos, n: int, size: int):
    """The ring after ``n`` tokens, gathered from entries ``keys`` [B, H, S, E] at positions
    ``kpos`` [S] (each position at most once). The gather copies entries verbatim (a NaN
    stays in its own slot) and keeps autograd intact."""
    want = ring_positions(xp, n, size, keys)
    pick = (want[:, None] == kpos[None, :]) & (want[:, None] >= 0)  # [size, S]
    return gather_rows(xp, pick, keys)  # [B, H, size, E]


def ring_write(xp, ring, entry, pos: int):
    """Write ``entry`` [B, H, E] for position ``pos`` into ``ring`` [B, H, size, E]."""
    size = ring.shape[2]
    slot = xp.arange(size, device=device(ring)) == (pos % size)
    return xp.where(slot[None, None, :, None], entry[:, :, None, :], ring)
