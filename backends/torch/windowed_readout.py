"""The windowed readout (DESIGN 2.3): one softmax over the raw window (t-W, t], the fading
window (t-2W, t-W] and the visible entries of the eidetic store (2.4).

``windowed_readout`` / ``windowed_readout_step`` / ``windowed_readout_state`` are the op (the
signatures of the reference, [B, T, H, E] inputs, states in the reference's ring layout);
``readout`` is the form the windowed layers call, on [B, H, T, E] heads in the accumulation
dtype, with the store's snapshots as a third source. Both choose the torch path (banded
softmax, ``banded``) or the fused Triton kernel (``kernels/triton/windowed_readout.py``).
Under ``auto`` full causal attention (window None) stays on torch's scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
from memcore.spec.validate import check_windowed_readout_args

from .banded import band_partial
from .eidetic_store import store_partial
from .implementation import choose
from .numerics import acc_dtype, combine, default_scale, partial, sdpa
from .packed import check_cu_seqlens, cu_tensor, longest, segment_ids
from .rings import ring_positions, ring_to_seq, ring_write, seq_to_ring


def windowed_readout_state(q, window: int | None, fading: bool = False):
    """The empty state of ``windowed_readout`` for queries shaped like ``q`` [B, *, H, E]."""
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    acc = acc_dtype(q.dtype)
    raw = 0 if window is None else window
    z = torch.zeros(B, H, raw, E, dtype=acc, device=q.device)
    state = {"pos": 0, "k": z, "v": z}
    if fading:
        f = torch.zeros(B, H, 2 * window, E, dtype=acc, device=q.device)
        state.update(fk=f, fv=f)
    return state


def causal_full(q, k_cache, v_cache, k, v, pos: int):
    """Full causal softmax attention (scale 1/sqrt(E)) of q, k, v [B, H, T, E] at positions
    pos .. pos+T-1 after a cache of positions 0 .. pos-1. Returns (o, keys, values)."""
    T = q.shape[2]
    if pos == 0:
        return sdpa(q, k, v), k, v
    keys = torch.cat([k_cache, k], dim=2)
    vals = torch.cat([v_cache, v], dim=2)
    qp = torch.arange(pos, pos + T, device=q.device)
    mask = torch.arange(pos + T, device=q.device)[None, :] <= qp[:, None]
    return sdpa(q, keys, vals, mask), keys, vals


def readout(q, pos: int, window: int, raw, fading=None, store=None, *, implementation="auto"):
    """The windowed layers' readout with a window: o [B, H, T, E].

    q [B, H, T, E] at positions pos ..; raw = (k, v) [B, H, W + T, E] from position pos - W;
    fading = (k, v) [B, H, 2W + T, E] from pos - 2W; store: the store's snapshots of each
    chunk the call touches, ``(snap, chunk, c0, front)`` from ``eidetic_store.select`` (snap:
    k, v [B, H, nC, M, E], pos [B, nC, M]), or None.
    """
    T = q.shape[2]
    unserved = "an empty sequence (T = 0)" if T == 0 else None
    scale = default_scale(q.shape[-1])
    if choose("windowed_readout", implementation, q, unserved) == "triton":
        return _kernel_readout(q, pos, window, raw, fading, store)
    sources = [(raw[0], raw[1], pos - window, 0, window)]
    if fading is not None:
        sources.append((fading[0], fading[1], pos - 2 * window, window, 2 * window))
    parts = [band_partial(q, pos, sources, scale)]
    if store is not None and store[0]["k"].shape[3]:
        snap, chunk, c0, front = store
        parts.append(store_partial(q, snap, c0, front, chunk, window, scale))
    return combine(parts)


def packed_readout(q, raw, fading, window, bounds, store_parts=(), *, implementation="auto"):
    """The windowed readout of a packed row (``bounds``: its checked cu_seqlens): q, and raw
    = (k, v), fading = (k, v) or None, all [B, H, T, E] at positions within documents; a query
    reads keys of its own document only. ``store_parts``: partial softmaxes (m, l, acc) of
    other sources over the same queries (the store's). Returns o [B, H, T, E]."""
    B, H, T, E = q.shape
    seg = segment_ids(bounds, q.device)
    unserved = "an empty sequence (T = 0)" if T == 0 else None
    if store_parts:
        unserved = "a store source in a packed row"
    if choose("windowed_readout", implementation, q, unserved) == "triton":
        from memcore.kernels.triton.windowed_readout import windowed_readout as kernel

        fk, fv = (None, None) if fading is None else (a.transpose(1, 2) for a in fading)
        o = kernel(q.transpose(1, 2), raw[0].transpose(1, 2), raw[1].transpose(1, 2), window,
                   fk, fv, cu_seqlens=cu_tensor(bounds))
        return o.transpose(1, 2)
    scale = default_scale(E)

    def run(a, back: int):  # the band's keys start ``back`` positions before 0
        return torch.cat([a.new_zeros(B, H, back, E), a], dim=2)

    # Full causal attention within documents is a band as wide as the longest document:
    # O(T x longest), not T x T.
    raw_w = longest(bounds) if window is None else window
    sources = [(run(raw[0], raw_w), run(raw[1], raw_w), -raw_w, 0, raw_w)]
    if fading is not None:
        sources.append((run(fading[0], 2 * window), run(fading[1], 2 * window), -2 * window,
                        window, 2 * window))
    return combine([band_partial(q, 0, sources, scale, seg=seg), *store_parts])


def _kernel_readout(q, pos: int, window, raw, fading, store):
    """``readout`` on the fused kernel, which takes one cache length for both windows: rows
    before position 0 (the rings' empty slots) are left out, and the raw cache is padded where
    only the fading one reaches. window None: raw holds every key from position 0."""
    from memcore.kernels.triton.windowed_readout import windowed_readout as kernel

    B, H, T, E = q.shape
    if window is None:
        reach = pos
    else:
        reach = min(pos, 2 * window if fading is not None else window)

    def seq(a, back: int):
        held = min(reach, back)
        a = a[:, :, back - held:]
        if held < reach:  # beyond the raw window: never visible to a raw key
            a = torch.cat([a.new_zeros(B, H, reach - held, E), a], dim=2)
        return a.transpose(1, 2)

    back = pos if window is None else window
    k, v = (seq(a, back) for a in raw)
    fk = fv = None
    if fading is not None:
        fk, fv = (seq(a, 2 * window) for a in fading)
    sk = sv = sp = chunk = None
    if store is not None and store[0]["k"].shape[3]:
        snap, chunk = store[0], store[1]
        sk, sv, sp = snap["k"], snap["v"], snap["pos"]
    o = kernel(q.transpose(1, 2), k, v, window, fk, fv, sk, sv, sp, chunk, pos)
    return o.transpose(1, 2)


def windowed_readout(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                     return_final_state=False, cu_seqlens=None, *, implementation="auto"):
    """One softmax (scale 1/sqrt(E)) over the raw window (t-W, t] of (k, v) and, if given,
    the fading window (t-2W, t-W] of (fading_k, fading_v). All [B, T, H, E], already rotated.
    ``cu_seqlens`` (int32 [N + 1], B = 1): a query reads its own document only; the state
    is the last document's.
    """
    check_windowed_readout_args(q, k, v, fading_k, fading_v, window, initial_state,
                                streaming=False)
    bounds = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0], initial_state,
                              "windowed_readout")
    fading = fading_k is not None
    if bounds is not None:
        return _packed_op(q, k, v, window, fading_k, fading_v, bounds, return_final_state,
                          implementation)
    state = initial_state or windowed_readout_state(q, window, fading)
    acc = acc_dtype(q.dtype)

    def c(a):
        return a.to(acc).transpose(1, 2)

    pos, T, W = state["pos"], q.shape[1], window
    qq, kk, vv = c(q), c(k), c(v)
    new = {"pos": pos + T}
    if W is None:
        impl = "torch" if implementation == "auto" else implementation
        if choose("windowed_readout", impl, q, "an empty sequence (T = 0)" if T == 0
                  else None) == "triton":
            new["k"] = torch.cat([state["k"], kk], dim=2)
            new["v"] = torch.cat([state["v"], vv], dim=2)
            o = _kernel_readout(qq, pos, None, (new["k"], new["v"]), None, None)
        else:
            o, new["k"], new["v"] = causal_full(qq, state["k"], state["v"], kk, vv, pos)
    else:
        rk = torch.cat([ring_to_seq(state["k"], pos), kk], dim=2)
        rv = torch.cat([ring_to_seq(state["v"], pos), vv], dim=2)
        new["k"], new["v"] = seq_to_ring(rk[:, :, -W:], pos + T), seq_to_ring(rv[:, :, -W:],
                                                                             pos + T)
        fad = None
        if fading:
            ek = torch.cat([ring_to_seq(state["fk"], pos), c(fading_k)], dim=2)
            ev = torch.cat([ring_to_seq(state["fv"], pos), c(fading_v)], dim=2)
            fad = (ek, ev)
            new["fk"] = seq_to_ring(ek[:, :, -2 * W:], pos + T)
            new["fv"] = seq_to_ring(ev[:, :, -2 * W:], pos + T)
        o = readout(qq, pos, W, (rk, rv), fad, implementation=implementation)
    o = o.transpose(1, 2).to(q.dtype)
    return (o, new) if return_final_state else o


def _packed_op(q, k, v, window, fading_k, fading_v, bounds, return_final_state, implementation):
    """``windowed_readout`` on a packed row: (o, the last document's state)."""
    acc = acc_dtype(q.dtype)

    def c(a):
        return a.to(acc).transpose(1, 2)

    fad = None if fading_k is None else (c(fading_k), c(fading_v))
    kk, vv = c(k), c(v)
    o = packed_readout(c(q), (kk, vv), fad, window, bounds, implementation=implementation)
    o = o.transpose(1, 2).to(q.dtype)
    if not return_final_state:
        return o
    last, n = bounds[-2], q.shape[1] - bounds[-2]
    state = windowed_readout_state(q, window, fad is not None)
    state["pos"] = n
    if window is None:
        state["k"], state["v"] = kk[:, :, last:], vv[:, :, last:]
        return o, state
    for name, a, size in (("k", kk, window), ("v", vv, window)) + (
            () if fad is None else (("fk", fad[0], 2 * window), ("fv", fad[1], 2 * window))):
        seq = torch.cat([state[name], a[:, :, last:]], dim=2)  # zeros, then the document
        state[name] = seq_to_ring(seq[:, :, -size:], n)
    return o, state


def windowed_readout_step(q_t, k_t, v_t, state, window=None, fading_k_t=None, fading_v_t=None):
    """Streaming form of ``windowed_readout``: [B, H, E] inputs -> (o_t [B, H, E], state)."""
    check_windowed_readout_args(q_t, k_t, v_t, fading_k_t, fading_v_t, window, state,
                                streaming=True)
    acc = acc_dtype(q_t.dtype)
    pos, dev = state["pos"], q_t.device
    B, H, E = q_t.shape
    k_t, v_t = k_t.to(acc), v_t.to(acc)
    new = {"pos": pos + 1}
    if window is None:
        new["k"] = torch.cat([state["k"], k_t[:, :, None]], dim=2)
        new["v"] = torch.cat([state["v"], v_t[:, :, None]], dim=2)
        mask = torch.ones(pos + 1, dtype=torch.bool, device=dev)
    else:
        new["k"] = ring_write(state["k"], k_t, pos)
        new["v"] = ring_write(state["v"], v_t, pos)
        mask = ring_positions(pos + 1, window, dev) >= 0
    keys, vals, masks = [new["k"]], [new["v"]], [mask]
    if fading_k_t is not None:
        new["fk"] = ring_write(state["fk"], fading_k_t.to(acc), pos)
        new["fv"] = ring_write(state["fv"], fading_v_t.to(acc), pos)
        sp = ring_positions(pos + 1, 2 * window, dev)
        keys.append(new["fk"])
        vals.append(new["fv"])
        masks.append((sp >= 0) & (sp <= pos - window))
    sc = (q_t.to(acc)[:, :, None] @ torch.cat(keys, 2).transpose(-1, -2)) * default_scale(E)
    mask = torch.cat(masks)[None, None, None, :].expand(B, H, 1, -1)
    o = combine([partial(sc, mask, torch.cat(vals, 2))])[:, :, 0]
    return o.to(q_t.dtype), new
