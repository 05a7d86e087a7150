"""Ring buffers (slot p % R holds position p) and the growing cache of an unbounded window.

Rings are [B, H, R, E]; positions before 0 (a stream shorter than the ring) hold zeros, as the
reference stores them."""

from __future__ import annotations

import torch


def ring_positions(n: int, size: int, device):
    """Position held by each slot of a ring of ``size`` after n tokens (< 0: empty)."""
    i = torch.arange(size, device=device)
    return (n - 1) - torch.remainder((n - 1) - i, size)


def ring_to_seq(ring, n: int):
    """A ring [B, H, R, E] after n tokens, as positions n-R .. n-1 in order."""
    R = ring.shape[2]
    return torch.roll(ring, shifts=-(n % R), dims=2) if R else ring


def seq_to_ring(seq, n: int):
    """The inverse: ``seq`` [B, H, R, E] holds positions n-R .. n-1; negative positions are
    stored as zeros."""
    R = seq.shape[2]
    if R == 0:
        return seq
    if n < R:
        keep = torch.arange(R, device=seq.device) >= R - n
        seq = torch.where(keep[:, None], seq, 0.0)
    return torch.roll(seq, shifts=n % R, dims=2)


def ring_write(ring, entry, pos: int, inplace: bool = False):
    """The ring with ``entry`` [B, H, E] written at slot pos % R: a new tensor of the same
    size, or, with ``inplace``, the given ring itself (a preallocated buffer)."""
    slot = pos % ring.shape[2]
    if inplace:
        ring[:, :, slot] = entry
        return ring
    return ring.index_copy(2, torch.tensor([slot], device=ring.device), entry[:, :, None, :])


def append_in_place(cache, entry):
    """``cat([cache, entry[:, :, None]], dim=2)`` for a cache [B, H, n, E] that grows by one
    entry [B, H, E] per token, amortised: the cache is the first n slots of a larger buffer
    that this function made, so an append writes one slot and returns a longer view of it; a
    full buffer (or any other tensor) is copied once into one with room to spare. Memory
    outside a tensor is only written when the buffer was made here, so a caller's slice of
    their own tensor is never written past its end."""
    B, H, n, E = cache.shape
    base = cache._base
    if (base is not None and getattr(base, "_memcore_growable", False) and n < base.shape[2]
            and cache.storage_offset() == base.storage_offset()
            and cache.stride() == base.stride() and base.shape[:2] == (B, H)
            and base.shape[3] == E):
        base[:, :, n] = entry
        return base[:, :, :n + 1]
    base = torch.empty(B, H, n + max(64, n // 2), E, dtype=cache.dtype, device=cache.device)
    base._memcore_growable = True
    base[:, :, :n] = cache
    base[:, :, n] = entry
    return base[:, :, :n + 1]
