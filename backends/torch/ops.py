"""The primitives of ``memcore.spec.reference.ops`` on torch tensors, with the backend's fast
forms (chunked scan, banded attention, sorted selection). Same names, signatures and state
layouts as the reference, so ``memcore.ops`` can route torch tensors here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from memcore.spec.reference.ops import windowed_attention_state as windowed_attention_state
from memcore.spec.validate import check_attention_args

from . import store as _store
from ._util import acc_dtype
from .attention import (
    band_partial,
    band_sdpa,
    causal_full,
    combine,
    default_scale,
    partial,
    ring_slot_positions,
    ring_to_seq,
    ring_write,
    seq_to_ring,
)
from .scan import leaky_average, leaky_average_step, selective_scan, selective_state_update

__all__ = [
    "selective_scan", "selective_state_update", "leaky_average", "leaky_average_step",
    "windowed_attention", "windowed_attention_step", "windowed_attention_state",
    "associative_readout", "persistent_readout", "store_top", "store_merge",
    "innovation_scores",
]


def windowed_attention(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                       return_final_state=False):
    """One softmax (scale 1/sqrt(E)) over the raw window (t-W, t] of (k, v) and, if given,
    the fading window (t-2W, t-W] of (fading_k, fading_v). All [B, T, H, E], already rotated.
    """
    check_attention_args(q, k, v, fading_k, fading_v, window, initial_state, streaming=False)
    fading = fading_k is not None
    state = initial_state or windowed_attention_state(q, window, fading)
    acc = acc_dtype(q.dtype)

    def c(a):
        return a.to(acc).transpose(1, 2)

    pos, T, W = state["pos"], q.shape[1], window
    qq, kk, vv = c(q), c(k), c(v)
    new = {"pos": pos + T}
    if W is None:
        o, new["k"], new["v"] = causal_full(qq, state["k"], state["v"], kk, vv, pos)
    else:
        rk = torch.cat([ring_to_seq(state["k"], pos), kk], dim=2)
        rv = torch.cat([ring_to_seq(state["v"], pos), vv], dim=2)
        sources = [(rk, rv, pos - W, 0, W)]
        new["k"], new["v"] = seq_to_ring(rk[:, :, -W:], pos + T), seq_to_ring(rv[:, :, -W:],
                                                                             pos + T)
        if fading:
            ek = torch.cat([ring_to_seq(state["fk"], pos), c(fading_k)], dim=2)
            ev = torch.cat([ring_to_seq(state["fv"], pos), c(fading_v)], dim=2)
            sources.append((ek, ev, pos - 2 * W, W, 2 * W))
            new["fk"] = seq_to_ring(ek[:, :, -2 * W:], pos + T)
            new["fv"] = seq_to_ring(ev[:, :, -2 * W:], pos + T)
        o = combine([band_partial(qq, pos, sources, default_scale(q.shape[-1]))])
    o = o.transpose(1, 2).to(q.dtype)
    return (o, new) if return_final_state else o


def windowed_attention_step(q_t, k_t, v_t, state, window=None, fading_k_t=None, fading_v_t=None):
    """Streaming form of ``windowed_attention``: [B, H, E] inputs -> (o_t [B, H, E], state)."""
    check_attention_args(q_t, k_t, v_t, fading_k_t, fading_v_t, window, state,
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
        mask = ring_slot_positions(pos + 1, window, dev) >= 0
    keys, vals, masks = [new["k"]], [new["v"]], [mask]
    if fading_k_t is not None:
        new["fk"] = ring_write(state["fk"], fading_k_t.to(acc), pos)
        new["fv"] = ring_write(state["fv"], fading_v_t.to(acc), pos)
        sp = ring_slot_positions(pos + 1, 2 * window, dev)
        keys.append(new["fk"])
        vals.append(new["fv"])
        masks.append((sp >= 0) & (sp <= pos - window))
    sc = (q_t.to(acc)[:, :, None] @ torch.cat(keys, 2).transpose(-1, -2)) * default_scale(E)
    mask = torch.cat(masks)[None, None, None, :].expand(B, H, 1, -1)
    o = combine([partial(sc, mask, torch.cat(vals, 2))])[:, :, 0]
    return o.to(q_t.dtype), new


def associative_readout(k, v, capacity=None):
    """y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j, no scale; y_0 = 0.
    k, v: [B, T, H, E] (keys double as queries)."""
    if k.ndim != 4 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"associative_readout: k and v must be [B, T, H, E] of one shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 1):
        raise ValueError(f"associative_readout: capacity must be a positive int or None, "
                         f"got {capacity!r}")
    acc = acc_dtype(k.dtype)
    kk, vv = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)
    B, H, T, E = kk.shape
    if capacity is None:
        y = vv[:, :, :1] * 0.0  # the first position reads nothing (kept on the graph)
        if T > 1:  # strictly causal: query t reads j <= t-1
            rest = F.scaled_dot_product_attention(kk[:, :, 1:], kk[:, :, :-1], vv[:, :, :-1],
                                                  is_causal=True, scale=1.0)
            y = torch.cat([y, rest], dim=2)
    else:
        pad = torch.zeros(B, H, capacity, E, dtype=acc, device=k.device)
        src = (torch.cat([pad, kk], 2), torch.cat([pad, vv], 2), -capacity, 1, capacity + 1)
        y = band_sdpa(kk, 0, src, 1.0)
    return y.transpose(1, 2).to(k.dtype)


def persistent_readout(k, mem_k, mem_v):
    """softmax(k . mem_k) mem_v per head: k [..., H, E]; mem_k, mem_v [H, P, E]."""
    H, E = k.shape[-2], k.shape[-1]
    if mem_k.ndim != 3 or tuple(mem_k.shape[::2]) != (H, E) or tuple(mem_v.shape) != tuple(
            mem_k.shape):
        raise ValueError(f"persistent_readout: mem_k and mem_v must be [H={H}, P, E={E}], got "
                         f"{tuple(mem_k.shape)} and {tuple(mem_v.shape)}")
    acc = acc_dtype(k.dtype)
    w = torch.softmax(torch.einsum("...he,hpe->...hp", k.to(acc), mem_k.to(acc)), dim=-1)
    return torch.einsum("...hp,hpe->...he", w, mem_v.to(acc)).to(k.dtype)


def store_top(entries: dict, n: int) -> dict:
    """The first n entries of an entry set (k, v [B, H, S, E]; score, pos [B, S]) in the
    store's total order: filled first, higher score first, later position first on ties."""
    return _store.top(entries, n)


def store_merge(a: dict, b: dict, n: int) -> dict:
    """The best n entries of the union of two entry sets (associative)."""
    return _store.merge(a, b, n)


def innovation_scores(x, s_prev, pred_weight):
    """r_t = mean((x_t - s_{t-1} pred_weight^T)^2): x, s_prev [B, T, D] -> [B, T]."""
    return _store.innovation_scores(x, s_prev, pred_weight)
