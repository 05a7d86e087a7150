"""The model's short causal depthwise convolution before each mixer (``Model.short_conv``), as
``memcore.spec.reference.short_conv``: y_t = sum_k w[:, k] g_{t-K+1+k}, zero before the first
token; the streaming state is the last K - 1 inputs, past [B, K - 1, D]."""

from __future__ import annotations

import torch

from .packed import doc_positions


def init_state(batch: int, d_model: int, width: int, *, dtype, device) -> torch.Tensor:
    return torch.zeros(batch, width - 1, d_model, dtype=dtype, device=device)


def check_state(spec, conv, batch: int, dtype, device) -> None:
    """A model state's ``conv``: one tensor [batch, K - 1, D] of ``dtype`` on ``device`` per
    block, or a ValueError naming what differs."""
    want = (batch, spec.short_conv - 1, spec.d_model)
    if isinstance(conv, (tuple, list)) and len(conv) == spec.n_layers and all(
            isinstance(c, torch.Tensor) and tuple(c.shape) == want and c.dtype == dtype
            and c.device == torch.device(device) for c in conv):
        return
    got = [(tuple(c.shape), c.dtype, str(c.device)) if isinstance(c, torch.Tensor) else
           type(c).__name__ for c in conv] if isinstance(conv, (tuple, list)) else conv
    raise ValueError(f"state['conv'] must hold {spec.n_layers} tensors of shape {want} and "
                     f"dtype {dtype} on {device} (each block's last short_conv - 1 inputs), "
                     f"got {got!r:.160}")


def forward(g, w, past, bounds=None):
    """g [B, T, D], w [D, K], past [B, K - 1, D] -> (y [B, T, D], past after g [B, K - 1, D]).
    ``bounds``: a packed row's checked cu_seqlens (``past`` is then the empty one): a tap
    reaching before its document's first token reads 0."""
    T, K = g.shape[1], w.shape[1]
    full = torch.cat([past.to(g.dtype), g], dim=1)  # row s is input s - (K - 1)
    if bounds is None:
        # one depthwise conv1d over the past and the new inputs (no padding: the past is it)
        y = torch.nn.functional.conv1d(full.transpose(1, 2), w[:, None, :],
                                       groups=w.shape[0]).transpose(1, 2)
        return y, full[:, T:]
    pos = doc_positions(bounds, g.device)
    y = None
    for k in range(K):  # where, not a multiply: a non-finite input stays in its document
        tap = full[:, k:k + T]
        tap = torch.where((pos >= K - 1 - k)[None, :, None], tap, torch.zeros_like(tap))
        y = tap * w[:, k] if y is None else y + tap * w[:, k]
    rows = torch.arange(T - K + 1, T, device=g.device)  # the inputs the past holds
    new = torch.where((rows >= bounds[-2])[None, :, None], full[:, T:],
                      torch.zeros_like(full[:, T:]))
    return y, new


def step(g_t, w, past, inplace: bool = False):
    """g_t [B, D], w [D, K], past [B, K - 1, D] -> (y_t [B, D], past after g_t); with
    ``inplace`` ``past`` itself is shifted and returned."""
    window = torch.cat([past.to(g_t.dtype), g_t[:, None]], dim=1)  # [B, K, D]
    y = (window * w.T).sum(1)
    if inplace:
        past.copy_(window[:, 1:])
        return y, past
    return y, window[:, 1:]
