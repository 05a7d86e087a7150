"""The model's short causal depthwise convolution before each mixer (``Model.short_conv``), both
forms:

    y_t = sum_k w[:, k] g_{t-K+1+k}        w [D, K]; g_s = 0 before the first token

The streaming state is the last K - 1 inputs, ``past`` [B, K - 1, D] (zeros at the start). In a
packed row a tap that reaches before its document's first token reads 0 (masked with ``where``,
so a non-finite input stays inside its document), and the state returned is the last
document's.
"""

from __future__ import annotations

from .numerics import device
from .packed import doc_positions


def init_state(xp, batch: int, d_model: int, width: int, like):
    """The empty past: zeros [batch, width - 1, d_model] of ``like``'s dtype and device."""
    return xp.zeros((batch, width - 1, d_model), dtype=like.dtype, device=device(like))


def forward(xp, g, w, past, bounds=None):
    """g [B, T, D], w [D, K], past [B, K - 1, D] -> (y [B, T, D], past after g [B, K - 1, D]).
    ``bounds``: a packed row's checked cu_seqlens (``past`` is then the empty one)."""
    T, K = g.shape[1], w.shape[1]
    full = xp.concat([past, g], axis=1)  # [B, K - 1 + T, D]; row s is input s - (K - 1)
    pos = None if bounds is None else doc_positions(xp, bounds, g)
    y = None
    for k in range(K):
        tap = full[:, k:k + T, :]  # input t - (K - 1 - k) for each t
        if pos is not None:
            tap = xp.where((pos >= K - 1 - k)[None, :, None], tap, xp.zeros_like(tap))
        y = tap * w[:, k] if y is None else y + tap * w[:, k]
    new = full[:, T:, :]
    if pos is not None and K > 1:
        # rows of the past are inputs T - K + 1 .. T - 1; those before the last document's
        # first token belong to another document
        keep = xp.asarray([T - K + 1 + j >= bounds[-2] for j in range(K - 1)],
                          device=device(g))
        new = xp.where(keep[None, :, None], new, xp.zeros_like(new))
    return y, new


def step(xp, g_t, w, past):
    """g_t [B, D], w [D, K], past [B, K - 1, D] -> (y_t [B, D], past after g_t)."""
    window = xp.concat([past, g_t[:, None, :]], axis=1)  # [B, K, D]
    y = None
    for k in range(w.shape[1]):
        term = window[:, k, :] * w[:, k]
        y = term if y is None else y + term
    return y, window[:, 1:, :]
