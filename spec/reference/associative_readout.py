"""Associative readout (DESIGN 2.5): Memory Mosaics' contextual memory,

    y_t = sum_{t - M <= j <= t - 1} softmax_j(k_t . k_j) v_j      (no scale; y = 0 with no j)

Keys double as queries. ``associative_readout`` is the primitive as an array function; the mosaic
layer keeps the (key, value) pairs in a memory (a KV cache, or a ring of the last M pairs with
``capacity`` M) and reads it with ``read_memory``.
"""

from __future__ import annotations

from ..validate import check_associative_readout_args
from .numerics import acc_dtype, cast_out, device, masked_softmax_readout, namespace
from .packed import check_cu_seqlens, same_document
from .rings import ring_positions, ring_write, seq_positions, seq_to_ring

__all__ = ["associative_readout"]


def read_memory(xp, q, mem_k, mem_v, mpos, qpos, capacity: int | None, same=None):
    """q: [B, H, Q, E] at positions qpos [Q]; memory pairs mem_k, mem_v [B, H, S, E] at
    positions mpos [S] (< 0: empty). A query at t reads the pairs t - M <= j <= t - 1;
    ``same`` [Q, S] (a packed row), only those of its own document."""
    mask = (mpos[None, :] <= qpos[:, None] - 1) & (mpos[None, :] >= 0)
    if capacity is not None:
        mask = mask & (mpos[None, :] >= qpos[:, None] - capacity)
    if same is not None:
        mask = mask & same
    scores = xp.matmul(q, xp.permute_dims(mem_k, (0, 1, 3, 2)))
    return masked_softmax_readout(xp, scores, mask[None, None], mem_v)


def memory_positions(xp, capacity: int | None, n_pairs: int, like):
    """Positions of the pairs held in memory after ``n_pairs`` completed pairs."""
    if capacity is None:
        return seq_positions(xp, 0, n_pairs, like)
    return ring_positions(xp, n_pairs, capacity, like)


def memory_extend(xp, capacity: int | None, mem_k, mem_v, kp, vp, pos: int):
    """Parallel form: the memory after the pairs kp, vp [B, H, T, E] completed by a call at
    positions pos .. pos+T-1 (pair j = pos-1 .. pos+T-2; j = -1 does not exist).

    Returns (keys and values of the old memory and the new pairs, their positions, the new
    memory keys, the new memory values)."""
    T = kp.shape[2]
    old_pos = memory_positions(xp, capacity, max(pos - 1, 0), kp)
    new_pos = xp.arange(pos - 1, pos + T - 1, dtype=xp.int64, device=device(kp))
    all_k = xp.concat([mem_k, kp], axis=2)
    all_v = xp.concat([mem_v, vp], axis=2)
    mpos = xp.concat([old_pos, new_pos])
    if capacity is None:
        drop = 1 if pos == 0 else 0
        new_k = xp.concat([mem_k, kp[:, :, drop:]], axis=2)
        new_v = xp.concat([mem_v, vp[:, :, drop:]], axis=2)
    else:
        n_new = max(pos + T - 1, 0)
        new_k = seq_to_ring(xp, all_k, mpos, n_new, capacity)
        new_v = seq_to_ring(xp, all_v, mpos, n_new, capacity)
    return all_k, all_v, mpos, new_k, new_v


def memory_write(xp, capacity: int | None, mem_k, mem_v, k, v, pos: int):
    """Streaming form: the pair (k, v) [B, H, E] of position ``pos`` enters the memory."""
    if capacity is None:
        return (xp.concat([mem_k, k[:, :, None]], axis=2),
                xp.concat([mem_v, v[:, :, None]], axis=2))
    return ring_write(xp, mem_k, k, pos), ring_write(xp, mem_v, v, pos)


def associative_readout(k, v, capacity=None, cu_seqlens=None):
    """y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j, no scale; y_0 = 0.

    k, v: [B, T, H, E] (keys double as queries). ``cu_seqlens`` (int32 [N + 1], B = 1): j
    only from t's document (y = 0 at each document's first token). The layer form, with a
    streaming state, is ``memcore.spec.mosaic``.
    """
    xp = namespace(k, v)
    check_associative_readout_args(k, v)
    bounds = check_cu_seqlens(cu_seqlens, k.shape[1], k.shape[0], None, "associative_readout")
    acc = acc_dtype(xp, k.dtype)
    kk = xp.permute_dims(xp.astype(k, acc), (0, 2, 1, 3))
    vv = xp.permute_dims(xp.astype(v, acc), (0, 2, 1, 3))
    i = xp.arange(k.shape[1], device=device(k))
    same = None if bounds is None else same_document(xp, bounds, k)
    y = read_memory(xp, kk, kk, vv, i, i, capacity, same)
    return cast_out(xp, xp.permute_dims(y, (0, 2, 1, 3)), k.dtype)
