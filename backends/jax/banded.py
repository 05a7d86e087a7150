"""Key sources of the windowed and associative readouts as softmax partials (see _base.combine).

Banded sources hold an extended key array: a prefix (the state's ring, unrolled to position
order) followed by this call's keys, laid out so that query i attends to entries i+1 .. i+width.
Queries are cut into blocks of Q = min(width, T); block b reads the slice [bQ, bQ + Q + width),
so the cost is T x (Q + width) and no T x T matrix is formed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._base import partial


def banded_partial(q, kx, vx, valid, width: int, scale: float):
    """q: [B, H, T, E]; kx, vx: [B, H, L, E]; valid: [B, L] (bool, entry holds a key).

    Query i reads entries j with i + 1 <= j <= i + width (and valid). Returns (m, l, o)
    with m, l [B, H, T] and o [B, H, T, E].
    """
    B, H, T, E = q.shape
    Q = max(1, min(width, T))
    nb = -(-T // Q)
    span = Q + width
    need = nb * Q + width
    L = kx.shape[2]
    if L < need:  # pad so every block's slice exists; padding is invalid
        pad = need - L
        kx = jnp.pad(kx, ((0, 0), (0, 0), (0, pad), (0, 0)))
        vx = jnp.pad(vx, ((0, 0), (0, 0), (0, pad), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    idx = (np.arange(nb)[:, None] * Q + np.arange(span)[None, :])  # [nb, span], static
    kg = kx[:, :, idx]  # [B, H, nb, span, E]
    vg = vx[:, :, idx]
    vmask = valid[:, idx]  # [B, nb, span]
    s_i = np.arange(Q)[:, None]
    u_i = np.arange(span)[None, :]
    band = (u_i >= s_i + 1) & (u_i <= s_i + width)  # [Q, span], static
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, nb * Q - T), (0, 0))).reshape(B, H, nb, Q, E)
    scores = jnp.einsum("bhnqe,bhnke->bhnqk", qp, kg) * scale
    mask = band[None, None, None] & vmask[:, None, :, None, :]
    m, l, o = partial(scores, mask, vg)
    return (m.reshape(B, H, nb * Q)[:, :, :T], l.reshape(B, H, nb * Q)[:, :, :T],
            o.reshape(B, H, nb * Q, E)[:, :, :T])


def dense_partial(q, k, v, mask, scale: float):
    """q: [B, H, T, E]; k, v: [B, H, S, E]; mask broadcastable to [B, H, T, S]."""
    scores = jnp.einsum("bhte,bhse->bhts", q, k) * scale
    mask = jnp.broadcast_to(mask, scores.shape)
    return partial(scores, mask, v)


def unroll_ring(ring, pos, size: int):
    """A ring [B, H, size, E] (position p in slot p % size) as positions pos - size .. pos - 1."""
    slots = jnp.remainder(pos + jnp.arange(size), size)
    return jnp.take(ring, slots, axis=2)


def refill_ring(ext, start, n, size: int):
    """The ring after ``n`` items, gathered from ``ext`` [B, H, L, E] whose entry j holds
    position start + j. Slots whose position is negative are zero."""
    s = jnp.arange(size)
    p = (n - 1) - jnp.remainder((n - 1) - s, size)
    j = jnp.clip(p - start, 0, ext.shape[2] - 1)
    out = jnp.take(ext, j, axis=2)
    return jnp.where((p >= 0)[None, None, :, None], out, jnp.zeros((), ext.dtype))


def ring_positions(n, size: int):
    """Position held by each slot of a ring after n items (< 0: empty)."""
    s = jnp.arange(size)
    return (n - 1) - jnp.remainder((n - 1) - s, size)
