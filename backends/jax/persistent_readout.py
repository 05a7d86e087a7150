"""Persistent readout (DESIGN 2.6): softmax(k . mem_k) mem_v per head, over learned slots."""

from __future__ import annotations

import jax.numpy as jnp
from memcore.spec.validate import check_persistent_readout_args

from .numerics import acc_dtype


def persistent_readout(k, mem_k, mem_v):
    """k [..., H, E]; mem_k, mem_v [H, P, E] -> [..., H, E]."""
    check_persistent_readout_args(k, mem_k, mem_v)
    acc = acc_dtype(k.dtype)
    scores = jnp.einsum("...he,hpe->...hp", k.astype(acc), mem_k.astype(acc))
    w = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("...hp,hpe->...he", w, mem_v.astype(acc)).astype(k.dtype)
