"""Windowed readout (DESIGN 2.3): one softmax over the raw window, the fading window and the
visible store entries, plus the ring buffers that hold the first two in the streaming state.

A ring of ``size`` slots holds, after ``n`` tokens, position p in slot p % size for the last
``size`` positions; slot positions are derived from n, so the ring carries no position array.
"""

from __future__ import annotations

import math

from ._xp import device, masked_softmax_readout

INT = "int64"


def positions(xp, start: int, length: int, like):
    return xp.arange(start, start + length, dtype=getattr(xp, INT), device=device(like))


def ring_positions(xp, n: int, size: int, like):
    """Position held by each slot of a ring of ``size`` after ``n`` tokens (< 0: empty)."""
    i = xp.arange(size, dtype=getattr(xp, INT), device=device(like))
    return (n - 1) - xp.remainder((n - 1) - i, size) if n > 0 else i * 0 - 1


def ring_refill(xp, keys, kpos, n: int, size: int):
    """The ring after ``n`` tokens, gathered from entries ``keys`` [B, H, S, E] at positions
    ``kpos`` [S] (each position at most once). A one-hot matmul keeps autograd intact."""
    want = ring_positions(xp, n, size, keys)
    onehot = xp.astype((want[:, None] == kpos[None, :]) & (want[:, None] >= 0), keys.dtype)
    return xp.matmul(onehot, keys)  # [size, S] @ [B, H, S, E]


def ring_push(xp, ring, entry, pos: int):
    """Write ``entry`` [B, H, E] for position ``pos`` into ``ring`` [B, H, size, E]."""
    size = ring.shape[2]
    slot = xp.arange(size, device=device(ring)) == (pos % size)
    return xp.where(slot[None, None, :, None], entry[:, :, None, :], ring)


def raw_mask(qpos, kpos, window: int | None):
    """A_t = { j : t - W < j <= t } (all j <= t when window is None). [Q, S]."""
    m = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= 0)
    if window is not None:
        m = m & (kpos[None, :] > qpos[:, None] - window)
    return m


def fading_mask(qpos, kpos, window: int):
    """F_t = { j : t - 2W < j <= t - W }. [Q, S]."""
    return ((kpos[None, :] <= qpos[:, None] - window)
            & (kpos[None, :] > qpos[:, None] - 2 * window) & (kpos[None, :] >= 0))


def readout(xp, q, sources):
    """q: [B, H, Q, E]; sources: list of (k [B, H, S, E], v [B, H, S, E], mask broadcastable to
    [B, H, Q, S]). One softmax with scale 1/sqrt(E) over all sources. Returns [B, H, Q, E]."""
    E = q.shape[-1]
    ks = xp.concat([s[0] for s in sources], axis=2)
    vs = xp.concat([s[1] for s in sources], axis=2)
    B, H, Q = q.shape[0], q.shape[1], q.shape[2]
    masks = [xp.broadcast_to(s[2], (B, H, Q, s[0].shape[2])) for s in sources]
    mask = xp.concat(masks, axis=-1)
    scores = xp.matmul(q, xp.permute_dims(ks, (0, 1, 3, 2))) * (1.0 / math.sqrt(E))
    return masked_softmax_readout(xp, scores, mask, vs)


def raw_source(xp, k, v, ring_k, ring_v, pos: int, window: int | None):
    """Parallel form of the raw source for queries at pos .. pos+T-1.

    k, v: [B, H, T, E]; ring_k, ring_v: the state's ring (or KV cache when window is None).
    Returns ((keys, values, mask [1, 1, T, S]), new ring_k, new ring_v).
    """
    T = k.shape[2]
    qpos = positions(xp, pos, T, k)
    kc = xp.concat([ring_k, k], axis=2)
    vc = xp.concat([ring_v, v], axis=2)
    old = positions(xp, 0, pos, k) if window is None else ring_positions(xp, pos, window, k)
    kpos = xp.concat([old, qpos])
    src = (kc, vc, raw_mask(qpos, kpos, window)[None, None])
    if window is None:
        return src, kc, vc
    return (src, ring_refill(xp, kc, kpos, pos + T, window),
            ring_refill(xp, vc, kpos, pos + T, window))


def fading_source(xp, fk, fv, ring_k, ring_v, pos: int, window: int):
    """Parallel form of the fading source; the ring holds 2 * window slots."""
    T = fk.shape[2]
    qpos = positions(xp, pos, T, fk)
    kc = xp.concat([ring_k, fk], axis=2)
    vc = xp.concat([ring_v, fv], axis=2)
    kpos = xp.concat([ring_positions(xp, pos, 2 * window, fk), qpos])
    src = (kc, vc, fading_mask(qpos, kpos, window)[None, None])
    return (src, ring_refill(xp, kc, kpos, pos + T, 2 * window),
            ring_refill(xp, vc, kpos, pos + T, 2 * window))


def raw_source_step(xp, k_t, v_t, ring_k, ring_v, pos: int, window: int | None):
    """Streaming form of ``raw_source``: k_t, v_t [B, H, E] at position pos."""
    qpos = positions(xp, pos, 1, k_t)
    if window is None:
        ring_k = xp.concat([ring_k, k_t[:, :, None]], axis=2)
        ring_v = xp.concat([ring_v, v_t[:, :, None]], axis=2)
        kpos = positions(xp, 0, pos + 1, k_t)
    else:
        ring_k = ring_push(xp, ring_k, k_t, pos)
        ring_v = ring_push(xp, ring_v, v_t, pos)
        kpos = ring_positions(xp, pos + 1, window, k_t)
    return (ring_k, ring_v, raw_mask(qpos, kpos, window)[None, None]), ring_k, ring_v


def fading_source_step(xp, fk_t, fv_t, ring_k, ring_v, pos: int, window: int):
    qpos = positions(xp, pos, 1, fk_t)
    ring_k = ring_push(xp, ring_k, fk_t, pos)
    ring_v = ring_push(xp, ring_v, fv_t, pos)
    kpos = ring_positions(xp, pos + 1, 2 * window, fk_t)
    return (ring_k, ring_v, fading_mask(qpos, kpos, window)[None, None]), ring_k, ring_v
