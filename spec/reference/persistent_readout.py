"""Persistent readout (DESIGN 2.6): Memory Mosaics' persistent memory, learned key/value slots
read by one softmax per head, ``y = softmax(k Mk^T) Mv``."""

from __future__ import annotations

from ..validate import check_persistent_readout_args
from .numerics import acc_dtype, cast_out, namespace

__all__ = ["persistent_readout"]


def read_slots(xp, k, mem_k, mem_v):
    """k: [..., H, E]; mem_k, mem_v: [H, P, E] -> [..., H, E], in k's dtype."""
    scores = xp.sum(k[..., :, None, :] * mem_k, axis=-1)  # [..., H, P]
    m = xp.max(scores, axis=-1, keepdims=True)
    w = xp.exp(scores - m)
    w = w / xp.sum(w, axis=-1, keepdims=True)
    return xp.sum(w[..., :, :, None] * mem_v, axis=-2)


def persistent_readout(k, mem_k, mem_v):
    """softmax(k . mem_k) mem_v per head: k [..., H, E]; mem_k, mem_v [H, P, E]."""
    xp = namespace(k, mem_k, mem_v)
    check_persistent_readout_args(k, mem_k, mem_v)
    acc = acc_dtype(xp, k.dtype)
    kk, mk, mv = (xp.astype(a, acc) for a in (k, mem_k, mem_v))
    return cast_out(xp, read_slots(xp, kk, mk, mv), k.dtype)
