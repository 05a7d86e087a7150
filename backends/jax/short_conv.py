"""The model's short causal depthwise convolution before each mixer (``Model.short_conv``), as
``memcore.spec.reference.short_conv``: y_t = sum_k w[:, k] g_{t-K+1+k}, zero before the first
token; the streaming state is the last K - 1 inputs, past [B, K - 1, D]."""

from __future__ import annotations

import jax.numpy as jnp

from .packed import doc_positions, last_start


def init_state(batch: int, d_model: int, width: int, dtype):
    return jnp.zeros((batch, width - 1, d_model), dtype)


def forward(g, w, past, cu=None):
    """g [B, T, D], w [D, K], past [B, K - 1, D] -> (y [B, T, D], past after g [B, K - 1, D]).
    ``cu``: a packed row's checked cu_seqlens (``past`` is then the empty one): a tap reaching
    before its document's first token reads 0, and the past returned is the last document's."""
    T, K = g.shape[1], w.shape[1]
    full = jnp.concatenate([past.astype(g.dtype), g], axis=1)  # row s is input s - (K - 1)
    if cu is None:
        y = sum(full[:, k:k + T] * w[:, k] for k in range(K))
        return y, full[:, T:]
    dpos = doc_positions(cu, T)
    zero = jnp.zeros((), g.dtype)
    # where, not a multiply: a non-finite input stays in its document
    y = sum(jnp.where((dpos >= K - 1 - k)[None, :, None], full[:, k:k + T], zero) * w[:, k]
            for k in range(K))
    rows = jnp.arange(T - K + 1, T)  # the inputs the past holds
    return y, jnp.where((rows >= last_start(cu))[None, :, None], full[:, T:], zero)


def step(g_t, w, past):
    """g_t [B, D], w [D, K], past [B, K - 1, D] -> (y_t [B, D], past after g_t)."""
    window = jnp.concatenate([past.astype(g_t.dtype), g_t[:, None]], axis=1)  # [B, K, D]
    return (window * w.T).sum(1), window[:, 1:]
