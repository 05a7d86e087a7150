"""Windowed readout (DESIGN 2.3): one softmax over the raw window, the fading window and the
visible store entries (the store's source is built in ``eidetic_store``).

Parallel form ``windowed_readout``, streaming form ``windowed_readout_step``, empty state
``windowed_readout_state``; the layers use the sources below directly. The raw and fading
windows of the streaming state are rings (see ``rings``).
"""

from __future__ import annotations

import math

from ..validate import check_windowed_readout_args
from .numerics import acc_dtype, cast_out, device, masked_softmax_readout, namespace
from .packed import check_cu_seqlens, same_document
from .rings import ring_positions, ring_write, seq_positions, seq_to_ring

__all__ = ["windowed_readout", "windowed_readout_step", "windowed_readout_state"]


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


def _packed_source(xp, k, v, bounds, mask_fn, size):
    """A source over a packed row: ``mask_fn`` (on positions) within each document, and the
    ring (``size`` slots; a KV cache when None) of the last document alone, as a state."""
    T = k.shape[2]
    qpos = seq_positions(xp, 0, T, k)
    src = (k, v, (mask_fn(qpos, qpos) & same_document(xp, bounds, k))[None, None])
    last = bounds[-2]
    kd, vd = k[:, :, last:], v[:, :, last:]
    if size is None:
        return src, kd, vd
    dpos = seq_positions(xp, 0, T - last, k)
    return (src, seq_to_ring(xp, kd, dpos, T - last, size),
            seq_to_ring(xp, vd, dpos, T - last, size))


def raw_source(xp, k, v, ring_k, ring_v, pos: int, window: int | None, bounds=None):
    """Parallel form of the raw source for queries at pos .. pos+T-1.

    k, v: [B, H, T, E]; ring_k, ring_v: the state's ring (or KV cache when window is None).
    ``bounds`` (a packed row's checked cu_seqlens; then pos is 0 and the rings are empty):
    keys only from the query's document, and the rings of the last document.
    Returns ((keys, values, mask [1, 1, T, S]), new ring_k, new ring_v).
    """
    if bounds is not None:
        return _packed_source(xp, k, v, bounds, lambda q, j: raw_mask(q, j, window), window)
    T = k.shape[2]
    qpos = seq_positions(xp, pos, T, k)
    kc = xp.concat([ring_k, k], axis=2)
    vc = xp.concat([ring_v, v], axis=2)
    old = seq_positions(xp, 0, pos, k) if window is None else ring_positions(xp, pos, window, k)
    kpos = xp.concat([old, qpos])
    src = (kc, vc, raw_mask(qpos, kpos, window)[None, None])
    if window is None:
        return src, kc, vc
    return (src, seq_to_ring(xp, kc, kpos, pos + T, window),
            seq_to_ring(xp, vc, kpos, pos + T, window))


def fading_source(xp, fk, fv, ring_k, ring_v, pos: int, window: int, bounds=None):
    """Parallel form of the fading source; the ring holds 2 * window slots."""
    if bounds is not None:
        return _packed_source(xp, fk, fv, bounds, lambda q, j: fading_mask(q, j, window),
                              2 * window)
    T = fk.shape[2]
    qpos = seq_positions(xp, pos, T, fk)
    kc = xp.concat([ring_k, fk], axis=2)
    vc = xp.concat([ring_v, fv], axis=2)
    kpos = xp.concat([ring_positions(xp, pos, 2 * window, fk), qpos])
    src = (kc, vc, fading_mask(qpos, kpos, window)[None, None])
    return (src, seq_to_ring(xp, kc, kpos, pos + T, 2 * window),
            seq_to_ring(xp, vc, kpos, pos + T, 2 * window))


def raw_source_step(xp, k_t, v_t, ring_k, ring_v, pos: int, window: int | None):
    """Streaming form of ``raw_source``: k_t, v_t [B, H, E] at position pos."""
    qpos = seq_positions(xp, pos, 1, k_t)
    if window is None:
        ring_k = xp.concat([ring_k, k_t[:, :, None]], axis=2)
        ring_v = xp.concat([ring_v, v_t[:, :, None]], axis=2)
        kpos = seq_positions(xp, 0, pos + 1, k_t)
    else:
        ring_k = ring_write(xp, ring_k, k_t, pos)
        ring_v = ring_write(xp, ring_v, v_t, pos)
        kpos = ring_positions(xp, pos + 1, window, k_t)
    return (ring_k, ring_v, raw_mask(qpos, kpos, window)[None, None]), ring_k, ring_v


def fading_source_step(xp, fk_t, fv_t, ring_k, ring_v, pos: int, window: int):
    qpos = seq_positions(xp, pos, 1, fk_t)
    ring_k = ring_write(xp, ring_k, fk_t, pos)
    ring_v = ring_write(xp, ring_v, fv_t, pos)
    kpos = ring_positions(xp, pos + 1, 2 * window, fk_t)
    return (ring_k, ring_v, fading_mask(qpos, kpos, window)[None, None]), ring_k, ring_v


# --- the primitive as array-in/array-out functions ([B, T, H, E] layout) -------------------

def _bhte(xp, a):
    return xp.permute_dims(a, (0, 2, 1, 3))


def windowed_readout_state(q, window: int | None, fading: bool = False):
    """The empty state of ``windowed_readout`` for queries shaped like ``q`` [B, *, H, E]."""
    xp = namespace(q)
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    acc = acc_dtype(xp, q.dtype)
    raw = 0 if window is None else window
    z = xp.zeros((B, H, raw, E), dtype=acc, device=device(q))
    state = {"pos": 0, "k": z, "v": z}
    if fading:
        f = xp.zeros((B, H, 2 * window, E), dtype=acc, device=device(q))
        state.update(fk=f, fv=f)
    return state


def windowed_readout(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                     return_final_state=False, cu_seqlens=None):
    """One softmax (scale 1/sqrt(E)) over the raw window (t-W, t] of (k, v) and, if given,
    the fading window (t-2W, t-W] of (fading_k, fading_v). All [B, T, H, E], already rotated
    (in a packed row, at positions within each document).
    ``cu_seqlens`` (int32 [N + 1], B = 1): a query reads only its own document; the state
    returned is the last document's.
    """
    xp = namespace(q, k, v)
    check_windowed_readout_args(q, k, v, fading_k, fading_v, window, initial_state,
                                streaming=False)
    bounds = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0], initial_state,
                              "windowed_readout")
    fading = fading_k is not None
    state = initial_state or windowed_readout_state(q, window, fading)
    acc = acc_dtype(xp, q.dtype)

    def c(a):
        return _bhte(xp, xp.astype(a, acc))

    pos = state["pos"]
    src, rk, rv = raw_source(xp, c(k), c(v), state["k"], state["v"], pos, window, bounds)
    sources = [src]
    n = q.shape[1] if bounds is None else bounds[-1] - bounds[-2]
    new = {"pos": pos + n, "k": rk, "v": rv}
    if fading:
        src, new["fk"], new["fv"] = fading_source(xp, c(fading_k), c(fading_v), state["fk"],
                                                  state["fv"], pos, window, bounds)
        sources.append(src)
    o = cast_out(xp, _bhte(xp, readout(xp, c(q), sources)), q.dtype)
    return (o, new) if return_final_state else o


def windowed_readout_step(q_t, k_t, v_t, state, window=None, fading_k_t=None, fading_v_t=None):
    """Streaming form of ``windowed_readout``: [B, H, E] inputs -> (o_t [B, H, E], state)."""
    xp = namespace(q_t, k_t, v_t)
    check_windowed_readout_args(q_t, k_t, v_t, fading_k_t, fading_v_t, window, state,
                                streaming=True)
    acc = acc_dtype(xp, q_t.dtype)

    def c(a):
        return xp.astype(a, acc)

    pos = state["pos"]
    src, rk, rv = raw_source_step(xp, c(k_t), c(v_t), state["k"], state["v"], pos, window)
    sources = [src]
    new = {"pos": pos + 1, "k": rk, "v": rv}
    if fading_k_t is not None:
        src, new["fk"], new["fv"] = fading_source_step(xp, c(fading_k_t), c(fading_v_t),
                                                       state["fk"], state["fv"], pos, window)
        sources.append(src)
    o = readout(xp, c(q_t)[:, :, None], sources)[:, :, 0]
    return cast_out(xp, o, q_t.dtype), new
