"""The model's short causal depthwise convolution before each mixer (``Model.short_conv``), as
``memcore.spec.reference.short_conv``: y_t = sum_k w[:, k] g_{t-K+1+k}, zero before the first
token; the streaming state is the last K - 1 inputs, past [B, K - 1, D]."""

from __future__ import annotations

import jax.numpy as jnp


def init_state(batch: int, d_model: int, width: int, dtype):
    return jnp.zeros((batch, width - 1, d_model), dtype)


def forward(g, w, past):
    """g [B, T, D], w [D, K], past [B, K - 1, D] -> (y [B, T, D], past after g [B, K - 1, D])."""
    T, K = g.shape[1], w.shape[1]
    full = jnp.concatenate([past.astype(g.dtype), g], axis=1)  # row s is input s - (K - 1)
    y = sum(full[:, k:k + T] * w[:, k] for k in range(K))
    return y, full[:, T:]


def step(g_t, w, past):
    """g_t [B, D], w [D, K], past [B, K - 1, D] -> (y_t [B, D], past after g_t)."""
    window = jnp.concatenate([past.astype(g_t.dtype), g_t[:, None]], axis=1)  # [B, K, D]
    return (window * w.T).sum(1), window[:, 1:]
