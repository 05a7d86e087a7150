"""Associative readout (DESIGN 2.5): y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j, no
scale, y_0 = 0; the keys double as the queries.

Memory of the streaming forms (``readout`` and ``readout_step``, which the mosaic layer uses):
``mem_k``, ``mem_v`` [B, H, S, E]: with a capacity M a ring of the last M pairs (pair j in slot
j % M); without, a growing cache, pair j in slot j (the first max(pos - 1, 0) slots filled).
There is no Pallas kernel: ``implementation`` accepts "auto" and "jax"; "pallas" raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from memcore.spec.validate import check_associative_readout_args

from . import implementation as impl
from .banded import banded_partial, dense_partial
from .numerics import acc_dtype, combine, partial
from .packed import check_cu_seqlens, segment_ids
from .rings import cache_write, ring_positions, ring_to_seq, ring_write, seq_to_ring


def associative_readout(k, v, capacity=None, cu_seqlens=None, *, implementation="auto"):
    """k, v: [B, T, H, E] -> y [B, T, H, E]. Banded when ``capacity`` is set.
    ``cu_seqlens`` (int32 [N + 1], B = 1; boundaries may be traced): a query reads pairs of
    its own document only."""
    impl.plain_only("associative_readout", implementation)
    check_associative_readout_args(k, v)
    cu = check_cu_seqlens(cu_seqlens, k.shape[1], k.shape[0], None, "associative_readout")
    return _associative(k, v, capacity, None if cu is None else segment_ids(cu, k.shape[1]))


@functools.partial(jax.jit, static_argnums=(2,))
def _associative(k, v, capacity, seg=None):
    acc = acc_dtype(k.dtype)
    B, T, H, E = k.shape
    kk, vv = (jnp.swapaxes(a.astype(acc), 1, 2) for a in (k, v))
    if seg is not None:
        return jnp.swapaxes(packed_readout(kk, kk, vv, seg, capacity), 1, 2).astype(k.dtype)
    if capacity is None:
        i = jnp.arange(T)
        part = dense_partial(kk, kk, vv, (i[None, :] <= i[:, None] - 1)[None, None], 1.0)
    else:
        # Entry j of the extended array is key j - (M + 1): query i reads i + 1 .. i + M.
        M = capacity
        pad = jnp.zeros((B, H, M + 1, E), acc)
        kx, vx = jnp.concatenate([pad, kk], axis=2), jnp.concatenate([pad, vv], axis=2)
        valid = jnp.broadcast_to(jnp.arange(M + 1 + T) >= M + 1, (B, M + 1 + T))
        part = banded_partial(kk, kx, vx, valid, M, 1.0)
    return jnp.swapaxes(combine([part]), 1, 2).astype(k.dtype)


def packed_readout(q, kp, vp, seg, capacity):
    """A packed row's readout: query t [B, H, T, E] reads pairs j = t - M .. t - 1 (all
    earlier ones without a capacity M) of kp, vp [B, H, T, E] whose document seg[j] is its
    own (seg [T], the document of each position). Returns o [B, H, T, E]."""
    B, H, T, E = q.shape
    if capacity is None:  # masked causal: T x T
        i = jnp.arange(T)
        mask = (i[None, :] <= i[:, None] - 1) & (seg[None, :] == seg[:, None])
        return combine([dense_partial(q, kp, vp, mask[None, None], 1.0)])
    M = capacity  # extended entry j holds pair j - (M + 1): query i reads i + 1 .. i + M
    pad = jnp.zeros((B, H, M + 1, E), kp.dtype)
    kx, vx = jnp.concatenate([pad, kp], axis=2), jnp.concatenate([pad, vp], axis=2)
    valid = jnp.broadcast_to(jnp.arange(M + 1 + T) >= M + 1, (B, M + 1 + T))
    eseg = jnp.concatenate([jnp.full((M + 1,), -1, seg.dtype), seg])
    return combine([banded_partial(q, kx, vx, valid, M, 1.0, seg=(seg, eseg))])


def readout(q, kp, vp, mem_k, mem_v, pos, capacity):
    """Parallel form with memory: queries q [B, H, T, E] at positions pos .. pos + T - 1; the
    pairs kp, vp [B, H, T, E] this call completes sit at positions pos - 1 .. pos + T - 2.
    Returns (o [B, H, T, E], mem_k, mem_v)."""
    B, _, T, _ = q.shape
    M = capacity
    if M is None:
        mem_k = cache_write(mem_k, kp, pos - 1)  # the pair at position -1 does not exist
        mem_v = cache_write(mem_v, vp, pos - 1)
        qpos = pos + jnp.arange(T)
        mask = jnp.arange(mem_k.shape[2])[None, :] <= qpos[:, None] - 1
        part = dense_partial(q, mem_k, mem_v, mask[None, None], 1.0)
    else:
        start = pos - 1 - M  # extended entry j holds pair position start + j
        kx = jnp.concatenate([ring_to_seq(mem_k, pos - 1, M), kp], axis=2)
        vx = jnp.concatenate([ring_to_seq(mem_v, pos - 1, M), vp], axis=2)
        valid = (start + jnp.arange(M + T)) >= 0
        part = banded_partial(q, kx, vx, jnp.broadcast_to(valid, (B, M + T)), M, 1.0)
        n_new = jnp.maximum(pos + T - 1, 0)
        mem_k = seq_to_ring(kx, start, n_new, M)
        mem_v = seq_to_ring(vx, start, n_new, M)
    return combine([part]), mem_k, mem_v


def readout_step(q, k_prev, v_prev, mem_k, mem_v, pos, capacity):
    """Streaming form: the query q [B, H, E] at position pos; the pair (k_prev, v_prev)
    [B, H, E] at pos - 1 enters memory first (at pos 0 there is none).
    Returns (o [B, H, E], mem_k, mem_v)."""
    M = capacity
    slot = pos - 1 if M is None else jnp.remainder(pos - 1, M)
    mem_k = ring_write(mem_k, k_prev[:, :, None], slot, pos >= 1)
    mem_v = ring_write(mem_v, v_prev[:, :, None], slot, pos >= 1)
    S = mem_k.shape[2]
    valid = jnp.arange(S) < pos if M is None else ring_positions(pos, M) >= 0
    scores = jnp.einsum("bhe,bhse->bhs", q, mem_k)[:, :, None]
    o = combine([partial(scores, valid[None, None, None], mem_v)])
    return o[:, :, 0], mem_k, mem_v
