"""Ring buffers and growing caches of keys and values, [B, H, slots, E].

A ring of ``size`` slots holds position p in slot p % size; a growing cache holds position p in
slot p and is regrown (``grow``) outside jit when a call needs more room. Positions may be
traced; sizes are static.
"""

from __future__ import annotations

import jax.numpy as jnp


def ring_positions(n, size: int):
    """Position held by each slot of a ring after n items (< 0: empty)."""
    s = jnp.arange(size)
    return (n - 1) - jnp.remainder((n - 1) - s, size)


def ring_to_seq(ring, pos, size: int):
    """A ring [B, H, size, E] read as positions pos - size .. pos - 1."""
    slots = jnp.remainder(pos + jnp.arange(size), size)
    return jnp.take(ring, slots, axis=2)


def seq_to_ring(seq, start, n, size: int):
    """The ring after ``n`` items, gathered from ``seq`` [B, H, L, E] whose entry j holds
    position start + j. Slots whose position is negative are zero."""
    p = ring_positions(n, size)
    j = jnp.clip(p - start, 0, seq.shape[2] - 1)
    out = jnp.take(seq, j, axis=2)
    return jnp.where((p >= 0)[None, None, :, None], out, jnp.zeros((), seq.dtype))


def ring_write(ring, entry, slot, write=True):
    """``ring`` [B, H, S, E] with ``entry`` [B, H, 1, E] in ``slot`` (where ``write`` holds)."""
    mask = (jnp.arange(ring.shape[2]) == slot) & write
    return jnp.where(mask[None, None, :, None], entry, ring)


def cache_write(cache, seq, start):
    """``cache`` [B, H, L, E] with ``seq`` [B, H, T, E] in slots start .. start + T - 1;
    entries at negative positions are dropped."""
    slot = start + jnp.arange(seq.shape[2])
    slot = jnp.where(slot < 0, cache.shape[2], slot)
    return cache.at[:, :, slot].set(seq, mode="drop")


def grow(cache, slots: int):
    """``cache`` [B, H, L, E] padded with empty slots to ``slots`` >= L."""
    return jnp.pad(cache, ((0, 0), (0, 0), (0, slots - cache.shape[2]), (0, 0)))
