"""Windowed readout (DESIGN 2.3): one softmax (scale 1/sqrt(E)) over the raw window, the fading
window and, in the layers, the visible eidetic store (2.4).

Each source is a softmax partial (``numerics.partial``); ``combine`` makes them one softmax.
Banded sources (``banded.py``) hold an extended key array: the state's ring, read in position
order, followed by this call's keys. ``implementation="pallas"`` runs
all sources in one call of ``memcore.kernels.pallas.windowed_readout``; a packed row's (raw and
fading windows, masked to each query's document) passes its ``cu_seqlens`` to the kernel, and
with a store source runs on JAX (``packed.PACKED_STORE_UNSERVED``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from memcore.spec.validate import check_windowed_readout_args

from . import eidetic_store
from . import implementation as impl
from .banded import banded_partial, dense_partial
from .numerics import acc_dtype, combine, is_traced
from .packed import PACKED_STORE_UNSERVED, check_cu_seqlens, last_start, segment_ids
from .rings import ring_positions, ring_to_seq, ring_write, seq_to_ring


def _banded_source(q, kx, vx, pos, back: int, window: int, scale: float):
    """A source whose extended keys start at position pos - back."""
    B, T = q.shape[0], q.shape[2]
    valid = (pos - back + jnp.arange(back + T)) >= 0
    return banded_partial(q, kx, vx, jnp.broadcast_to(valid, (B, back + T)), window, scale)


def readout(q, pos, window: int, raw, fading=None, store=None, *, implementation="auto"):
    """The windowed layers' readout, q [B, H, T, E] at positions pos .. (pos may be traced).

    raw = (k, v) [B, H, W + T, E] from position pos - W; fading = (k, v) [B, H, 2W + T, E]
    from pos - 2W; store = (snapshots, chunk layout, chunk) from ``eidetic_store.parallel``,
    snapshot s serving chunk pos // chunk + s. Returns o [B, H, T, E] in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl.choose("windowed_readout", implementation, q) == "pallas":
        return _kernel_readout(q, pos, window, raw, fading, store)
    parts = [_banded_source(q, *raw, pos, window, window, scale)]
    if fading is not None:
        parts.append(_banded_source(q, *fading, pos, 2 * window, window, scale))
    if store is not None:
        snap, layout, chunk = store
        parts.append(eidetic_store.visible_partial(q, snap, layout, window, chunk, scale))
    return combine(parts)


def _kernel_readout(q, pos, window, raw, fading, store):
    from memcore.kernels.pallas.windowed_readout import windowed_readout as kernel

    back = window if fading is None else 2 * window
    k, v = raw
    if fading is not None:
        # One key layout for both sources: the raw cache is front-padded to the fading one's
        # length; those rows lie beyond the raw window, so no raw query ever sees them.
        pad = [(0, 0), (0, 0), (window, 0), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    # ring slots before position 0 hold no key yet
    start = jnp.maximum(back - jnp.asarray(pos, jnp.int32), 0)
    seqs = [k, v] + ([] if fading is None else list(fading))
    k, v, *fk = (jnp.swapaxes(a, 1, 2) for a in seqs)
    fk, fv = fk if fk else (None, None)
    extra = () if store is None else (store[0]["k"], store[0]["v"], store[0]["pos"], store[2])
    o = kernel(jnp.swapaxes(q, 1, 2), k, v, window, fk, fv, *extra,
               pos=jnp.asarray(pos, jnp.int32), key_start=start, interpret=impl.interpret(q))
    return jnp.swapaxes(o, 1, 2)


def _packed_band(q, k, v, seg, back: int, width: int, scale: float):
    """Keys k, v [B, H, T, E] of a packed row as a banded source: query t reads positions
    t - back + 1 .. t - back + width of its own document (seg [T]: each position's)."""
    B, H, T, E = k.shape
    pad = jnp.zeros((B, H, back, E), k.dtype)
    valid = jnp.broadcast_to(jnp.arange(back + T) >= back, (B, back + T))
    eseg = jnp.concatenate([jnp.full((back,), -1, seg.dtype), seg])
    return banded_partial(q, jnp.concatenate([pad, k], axis=2), jnp.concatenate([pad, v], axis=2),
                          valid, width, scale, seg=(seg, eseg))


def packed_readout(q, raw, fading, window, seg, extra=(), *, cu=None, implementation="jax"):
    """The windowed readout of a packed row: q and raw = (k, v), fading = (k, v) or None, all
    [B, H, T, E] at positions within documents, seg [T] the document of each position; a
    query reads keys of its own document only. ``extra``: partial softmaxes of other sources
    over the same queries (the store's). ``cu`` (the row's cu_seqlens): needed by the kernel,
    which serves calls without ``extra``. Returns o [B, H, T, E] (the accumulation dtype on
    JAX, q's on the kernel)."""
    unserved = PACKED_STORE_UNSERVED if extra else None
    if cu is None:
        unserved = "packed_readout got no cu_seqlens (cu) for the kernel"
    if impl.choose("windowed_readout", implementation, q, unserved) == "pallas":
        from memcore.kernels.pallas.windowed_readout import windowed_readout as kernel

        k, v, *f = (jnp.swapaxes(a, 1, 2) for a in (raw + (fading or ())))
        fk, fv = f if f else (None, None)
        o = kernel(jnp.swapaxes(q, 1, 2), k, v, window, fk, fv, cu_seqlens=cu,
                   interpret=impl.interpret(q))
        return jnp.swapaxes(o, 1, 2)
    T = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if window is None:  # causal within the document: a T x T mask
        t = jnp.arange(T)
        mask = (t[None, :] <= t[:, None]) & (seg[None, :] == seg[:, None])
        parts = [dense_partial(q, *raw, mask[None, None], scale)]
    else:
        parts = [_packed_band(q, *raw, seg, window, window, scale)]
    if fading is not None:
        parts.append(_packed_band(q, *fading, seg, 2 * window, window, scale))
    return combine(parts + list(extra))


# --- the primitive on [B, T, H, E] arrays with the reference's state dicts ------------------

def windowed_readout_state(q, window: int | None, fading: bool = False):
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    acc = acc_dtype(q.dtype)
    z = jnp.zeros((B, H, 0 if window is None else window, E), acc)
    state = {"pos": 0, "k": z, "v": z}
    if fading:
        f = jnp.zeros((B, H, 2 * window, E), acc)
        state.update(fk=f, fv=f)
    return state


def _bhte(a, acc):
    return jnp.swapaxes(a.astype(acc), 1, 2)


def windowed_readout(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                     return_final_state=False, cu_seqlens=None, *, implementation="auto"):
    """One softmax (scale 1/sqrt(E)) over the raw window and, if given, the fading window;
    all inputs [B, T, H, E], already rotated. Banded when ``window`` is set. ``cu_seqlens``
    (int32 [N + 1], B = 1; boundaries may be traced): a query reads its own document only;
    the state is the last document's (with window=None its cache length is that document's
    length, so the boundaries must then be concrete)."""
    check_windowed_readout_args(q, k, v, fading_k, fading_v, window, initial_state,
                                streaming=False)
    cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0], initial_state, "windowed_readout")
    # Full causal attention stays on JAX unless the kernel is asked for by name.
    unserved = "window=None (full attention) runs on JAX under auto" if (
        window is None and implementation == "auto") else None
    choice = impl.choose("windowed_readout", implementation, q, unserved)
    if cu is not None:
        kernel = impl.interpret(q) if choice == "pallas" else None
        return _packed_op(q, k, v, window, fading_k, fading_v, cu, return_final_state, kernel)
    if choice == "pallas":
        o, new = _kernel_windowed(q, k, v, window, fading_k, fading_v, initial_state)
        return (o, new) if return_final_state else o
    fading = fading_k is not None
    state = initial_state or windowed_readout_state(q, window, fading)
    rings = {key: a for key, a in state.items() if key != "pos"}
    o, rings = _windowed(q, k, v, fading_k, fading_v, rings, jnp.asarray(state["pos"]), window)
    new = {"pos": state["pos"] + q.shape[1], **rings}
    return (o, new) if return_final_state else o


@functools.partial(jax.jit, static_argnums=(7,))
def _windowed(q, k, v, fading_k, fading_v, state, pos, window):
    acc = acc_dtype(q.dtype)
    B, T, H, E = q.shape
    scale = 1.0 / math.sqrt(E)
    qq, kk, vv = (_bhte(a, acc) for a in (q, k, v))
    new = {}
    if window is None:
        # The reference's cache holds every earlier token: its length is the position.
        kc = jnp.concatenate([state["k"].astype(acc), kk], axis=2)
        vc = jnp.concatenate([state["v"].astype(acc), vv], axis=2)
        start = state["k"].shape[2]
        mask = jnp.arange(start + T)[None, :] <= start + jnp.arange(T)[:, None]
        parts = [dense_partial(qq, kc, vc, mask[None, None], scale)]
        new.update(k=kc, v=vc)
    else:
        W = window
        kx = jnp.concatenate([ring_to_seq(state["k"].astype(acc), pos, W), kk], axis=2)
        vx = jnp.concatenate([ring_to_seq(state["v"].astype(acc), pos, W), vv], axis=2)
        parts = [_banded_source(qq, kx, vx, pos, W, W, scale)]
        new.update(k=seq_to_ring(kx, pos - W, pos + T, W), v=seq_to_ring(vx, pos - W, pos + T, W))
    if fading_k is not None:
        W = window
        fk, fv = _bhte(fading_k, acc), _bhte(fading_v, acc)
        fkx = jnp.concatenate([ring_to_seq(state["fk"].astype(acc), pos, 2 * W), fk], axis=2)
        fvx = jnp.concatenate([ring_to_seq(state["fv"].astype(acc), pos, 2 * W), fv], axis=2)
        parts.append(_banded_source(qq, fkx, fvx, pos, 2 * W, W, scale))
        new.update(fk=seq_to_ring(fkx, pos - 2 * W, pos + T, 2 * W),
                   fv=seq_to_ring(fvx, pos - 2 * W, pos + T, 2 * W))
    return jnp.swapaxes(combine(parts), 1, 2).astype(q.dtype), new


def _packed_op(q, k, v, window, fading_k, fading_v, cu, return_final_state, kernel=None):
    """``windowed_readout`` on a packed row: o, and with ``return_final_state`` the last
    document's state. ``kernel``: None (plain JAX) or the Pallas kernel's ``interpret``."""
    T = q.shape[1]
    if return_final_state and window is None and is_traced(cu):
        raise ValueError("windowed_readout: with window=None the final state's cache holds the "
                         "last document's tokens, a length the traced cu_seqlens does not fix; "
                         "pass concrete cu_seqlens or return_final_state=False")
    o, rings, n = _packed_jit(q, k, v, fading_k, fading_v, cu, window, kernel)
    if not return_final_state:
        return o
    n = n if is_traced(n) else int(n)
    state = {"pos": n, **rings}
    if window is None:  # concrete boundaries: the cache cut to the last document
        m = int(n)
        state = {"pos": m, **{name: a[:, :, T - m:] for name, a in rings.items()}}
    return o, state


@functools.partial(jax.jit, static_argnums=(6, 7))
def _packed_jit(q, k, v, fading_k, fading_v, cu, window, kernel):
    acc = acc_dtype(q.dtype)
    T = q.shape[1]
    qq, kk, vv = (_bhte(a, acc) for a in (q, k, v))
    fad = None if fading_k is None else (_bhte(fading_k, acc), _bhte(fading_v, acc))
    if kernel is None:
        o = packed_readout(qq, (kk, vv), fad, window, segment_ids(cu, T))
    else:  # the kernel on the inputs as given (its accumulation follows their dtype)
        from memcore.kernels.pallas.windowed_readout import windowed_readout as pallas

        o = jnp.swapaxes(pallas(q, k, v, window, fading_k, fading_v, cu_seqlens=cu,
                                interpret=kernel), 1, 2)
    ls = last_start(cu)
    n = T - ls
    seqs = {"k": kk, "v": vv}
    if fad is not None:
        seqs.update(fk=fad[0], fv=fad[1])
    if window is None:
        rings = seqs  # cut to the last document by the caller
    else:
        rings = {name: seq_to_ring(a, -ls, n, 2 * window if name in ("fk", "fv") else window)
                 for name, a in seqs.items()}
    return jnp.swapaxes(o, 1, 2).astype(q.dtype), rings, n


def _ring_tail(ring, pos: int, length: int):
    """The last ``length`` positions before ``pos`` as [B, length, H, E], read from a ring
    [B, H, size, E]; positions it does not hold read as zeros."""
    size = ring.shape[2]
    seq = ring_to_seq(ring, pos, size)[:, :, max(0, size - length):]
    seq = jnp.pad(seq, [(0, 0), (0, 0), (max(0, length - size), 0), (0, 0)])
    return jnp.swapaxes(seq, 1, 2)


def _kernel_windowed(q, k, v, window, fading_k, fading_v, initial_state):
    """The primitive on the kernel: earlier keys the queries can still reach come first."""
    from memcore.kernels.pallas.windowed_readout import windowed_readout as kernel

    fading = fading_k is not None
    T = q.shape[1]
    pos = 0 if initial_state is None else int(initial_state["pos"])
    # earlier keys the queries can still reach: W raw, 2W with the fading window, all if None
    reach = pos if window is None else min(pos, 2 * window if fading else window)
    seqs = {"k": k, "v": v}
    if fading:
        seqs.update(fk=fading_k, fv=fading_v)
    if reach > 0:
        for name in seqs:
            ring = initial_state[name]
            prev = (jnp.swapaxes(ring, 1, 2) if window is None  # a KV cache in position order
                    else _ring_tail(ring, pos, reach))
            seqs[name] = jnp.concatenate([prev.astype(q.dtype), seqs[name]], axis=1)
    o = kernel(q, seqs["k"], seqs["v"], window, seqs.get("fk"), seqs.get("fv"),
               interpret=impl.interpret(q))
    acc = acc_dtype(q.dtype)
    new = {"pos": pos + T}
    for name, seq in seqs.items():
        seq = jnp.swapaxes(seq.astype(acc), 1, 2)  # [B, H, reach + T, E]
        if window is None:
            new[name] = seq
        else:
            size = 2 * window if name in ("fk", "fv") else window
            new[name] = seq_to_ring(seq, pos - reach, pos + T, size)
    return o, new


def windowed_readout_step(q_t, k_t, v_t, state, window=None, fading_k_t=None, fading_v_t=None):
    """Streaming form: [B, H, E] inputs -> (o_t [B, H, E], state)."""
    check_windowed_readout_args(q_t, k_t, v_t, fading_k_t, fading_v_t, window, state,
                                streaming=True)
    rings = {key: a for key, a in state.items() if key != "pos"}
    o, rings = _windowed_step(q_t, k_t, v_t, fading_k_t, fading_v_t, rings,
                              jnp.asarray(state["pos"]), window)
    return o, {"pos": state["pos"] + 1, **rings}


@functools.partial(jax.jit, static_argnums=(7,))
def _windowed_step(q_t, k_t, v_t, fading_k_t, fading_v_t, state, pos, window):
    acc = acc_dtype(q_t.dtype)
    scale = 1.0 / math.sqrt(q_t.shape[-1])
    q, k, v = (a.astype(acc)[:, :, None] for a in (q_t, k_t, v_t))
    new = {}
    if window is None:
        rk = jnp.concatenate([state["k"].astype(acc), k], axis=2)
        rv = jnp.concatenate([state["v"].astype(acc), v], axis=2)
        mask = jnp.ones((rk.shape[2],), bool)
    else:
        slot = jnp.remainder(pos, window)
        rk = ring_write(state["k"].astype(acc), k, slot)
        rv = ring_write(state["v"].astype(acc), v, slot)
        mask = ring_positions(pos + 1, window) >= 0
    new.update(k=rk, v=rv)
    parts = [dense_partial(q, rk, rv, mask[None, None, None], scale)]
    if fading_k_t is not None:
        W = window
        slot = jnp.remainder(pos, 2 * W)
        fk = ring_write(state["fk"].astype(acc), fading_k_t.astype(acc)[:, :, None], slot)
        fv = ring_write(state["fv"].astype(acc), fading_v_t.astype(acc)[:, :, None], slot)
        fpos = ring_positions(pos + 1, 2 * W)
        fmask = (fpos >= 0) & (fpos <= pos - W)
        parts.append(dense_partial(q, fk, fv, fmask[None, None, None], scale))
        new.update(fk=fk, fv=fv)
    return combine(parts)[:, :, 0].astype(q_t.dtype), new
