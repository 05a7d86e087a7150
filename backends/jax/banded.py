"""Banded softmax over position windows (the JAX path of DESIGN 2.3 and 2.5).

A banded source holds an extended key array laid out so that query i attends to entries
i+1 .. i+width. Queries are cut into blocks of Q = min(width, T); block b reads the slice
[bQ, bQ + Q + width), so the cost is T x (Q + width) and no T x T matrix is formed. Each source
gives a softmax partial (``numerics.partial``); ``numerics.combine`` merges partials into one
softmax over the union of the sources.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .numerics import finite_values, partial


def banded_partial(q, kx, vx, valid, width: int, scale: float, seg=None):
    """q: [B, H, T, E]; kx, vx: [B, H, L, E]; valid: [B, L] (bool, entry holds a key).

    Query i reads entries j with i + 1 <= j <= i + width (and valid). ``seg`` (a packed
    row): (query_seg [T], entry_seg [L]), the document of each query and entry; a query then
    reads entries of its own document only. Returns (m, l, o) with m, l [B, H, T] and
    o [B, H, T, E].
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
        if seg is not None:
            seg = (seg[0], jnp.pad(seg[1], (0, pad), constant_values=-1))
    idx = (np.arange(nb)[:, None] * Q + np.arange(span)[None, :])  # [nb, span], static
    kg = kx[:, :, idx]  # [B, H, nb, span, E]
    # A block's slice holds keys later than some of its queries: non-finite values are zeroed
    # and flagged once, before the gather (numerics.masked_matmul).
    vx, bad = finite_values(vx)
    vg = vx[:, :, idx]
    vmask = valid[:, idx]  # [B, nb, span]
    s_i = np.arange(Q)[:, None]
    u_i = np.arange(span)[None, :]
    band = (u_i >= s_i + 1) & (u_i <= s_i + width)  # [Q, span], static
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, nb * Q - T), (0, 0))).reshape(B, H, nb, Q, E)
    scores = jnp.einsum("bhnqe,bhnke->bhnqk", qp, kg) * scale
    mask = band[None, None, None] & vmask[:, None, :, None, :]
    if seg is not None:
        qs = jnp.pad(seg[0], (0, nb * Q - T), constant_values=-2).reshape(nb, Q)
        mask = mask & (qs[:, :, None] == seg[1][idx][:, None, :])[None, None]
    m, l, o = partial(scores, mask, vg, bad[:, :, idx])
    return (m.reshape(B, H, nb * Q)[:, :, :T], l.reshape(B, H, nb * Q)[:, :, :T],
            o.reshape(B, H, nb * Q, E)[:, :, :T])


def dense_partial(q, k, v, mask, scale: float):
    """q: [B, H, T, E]; k, v: [B, H, S, E]; mask broadcastable to [B, H, T, S]."""
    scores = jnp.einsum("bhte,bhse->bhts", q, k) * scale
    mask = jnp.broadcast_to(mask, scores.shape)
    return partial(scores, mask, v)
