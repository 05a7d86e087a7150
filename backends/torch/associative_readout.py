"""The associative readout (DESIGN 2.5): ``y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j)
v_j``, no scale, ``y_0 = 0``; keys double as queries. The torch path (scaled_dot_product_attention,
banded for a capacity) or the Triton kernel (``kernels/triton/associative_readout.py``).

``associative_readout`` is the op; ``memory_readout`` is the form the mosaic layer calls, where
the keys of earlier calls sit in the layer's memory."""

from __future__ import annotations

import torch
from memcore.spec.validate import check_associative_readout_args

from .banded import band_sdpa
from .implementation import choose
from .numerics import acc_dtype, combine, partial, sdpa
from .packed import check_cu_seqlens, cu_tensor, same_document


def _check(k, v, capacity):
    check_associative_readout_args(k, v)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 1):
        raise ValueError(f"associative_readout: capacity must be a positive int or None, "
                         f"got {capacity!r}")


def associative_readout(k, v, capacity=None, cu_seqlens=None, *, implementation="auto"):
    """k, v: [B, T, H, E] -> y [B, T, H, E] in k's dtype. ``cu_seqlens`` (int32 [N + 1],
    B = 1): a query reads pairs of its own document only."""
    _check(k, v, capacity)
    bounds = check_cu_seqlens(cu_seqlens, k.shape[1], k.shape[0], None, "associative_readout")
    if choose("associative_readout", implementation, k) == "triton":
        from memcore.kernels.triton.associative_readout import associative_readout as kernel

        return kernel(k, v, capacity, cu_seqlens=cu_tensor(bounds))
    if bounds is not None:
        return _packed(k, v, capacity, bounds)
    acc = acc_dtype(k.dtype)
    kk, vv = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)
    B, H, T, E = kk.shape
    if capacity is None:
        # the first position reads nothing (kept on the graph, whatever v holds there)
        y = vv[:, :, :1].masked_fill(torch.ones((), dtype=torch.bool, device=k.device), 0.0)
        if T > 1:  # strictly causal: query t reads j <= t-1
            rest = sdpa(kk[:, :, 1:], kk[:, :, :-1], vv[:, :, :-1], scale=1.0)
            y = torch.cat([y, rest], dim=2)
    else:
        pad = torch.zeros(B, H, capacity, E, dtype=acc, device=k.device)
        src = (torch.cat([pad, kk], 2), torch.cat([pad, vv], 2), -capacity, 1, capacity + 1)
        y = band_sdpa(kk, 0, src, 1.0)
    return y.transpose(1, 2).to(k.dtype)


def _packed(k, v, capacity, bounds):
    """``associative_readout`` of a packed row: one masked softmax per query over the earlier
    pairs of its document (within the capacity)."""
    acc = acc_dtype(k.dtype)
    kk, vv = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)
    t = torch.arange(k.shape[1], device=k.device)
    mask = (t[None, :] <= t[:, None] - 1) & same_document(bounds, k.device)
    if capacity is not None:
        mask = mask & (t[None, :] >= t[:, None] - capacity)
    y = combine([partial(kk @ kk.transpose(-1, -2), mask, vv)])
    return y.transpose(1, 2).to(k.dtype)


def memory_readout(k, pair_k, pair_v, pos: int, capacity, *, implementation="auto"):
    """Memory Mosaics' readout of one call: y [B, H, T, E].

    k: the call's keys [B, T, H, E] (the queries, at positions pos ..); pair_k, pair_v
    [B, H, S, E]: the pairs in reach, in position order, ending with the pairs this call
    completes. Without a capacity they are every pair from position 0; with one, the ring's
    pairs from position n_old - capacity (n_old = max(pos - 1, 0); slots before position 0
    are empty). The kernel reads one plain sequence, the stored keys followed by the call's
    queries, so it serves a call without a capacity only at pos 0 (a stored cache would be
    re-read as queries).
    """
    T = k.shape[1]
    unserved = None
    if T == 0:
        unserved = "an empty sequence (T = 0)"
    elif capacity is None and pos > 0:
        unserved = "a memory without capacity after the first call"
    q = k.transpose(1, 2)
    if choose("associative_readout", implementation, k, unserved) == "triton":
        if capacity is not None:  # ring slots before position 0 are empty: leave them out
            live = capacity - min(max(pos - 1, 0), capacity)
            pair_k, pair_v = pair_k[:, :, live:], pair_v[:, :, live:]
        return _kernel_memory_readout(k, pair_k, pair_v, capacity).transpose(1, 2)
    if capacity is not None:
        n_old = max(pos - 1, 0)
        return band_sdpa(q, pos, (pair_k, pair_v, n_old - capacity, 1, capacity + 1), 1.0)
    if pos == 0:  # strictly causal: query t reads pairs j <= t-1; t = 0 reads nothing
        y = torch.zeros_like(q)
        if T > 1:
            rest = sdpa(q[:, :, 1:], pair_k, pair_v, scale=1.0)
            y = torch.cat([y[:, :, :1], rest], dim=2)
        return y
    qp = torch.arange(pos, pos + T, device=k.device)
    mask = torch.arange(pair_k.shape[2], device=k.device)[None, :] <= qp[:, None] - 1
    return sdpa(q, pair_k, pair_v, mask, scale=1.0)


def _kernel_memory_readout(k, pair_k, pair_v, capacity):
    """The call's queries follow the stored keys; the last key, whose value is not known yet,
    gets a zero value that no query reaches (each reads only earlier positions). The rows of
    the stored keys are computed and dropped. Returns y [B, T, H, E]."""
    from memcore.kernels.triton.associative_readout import associative_readout as kernel

    T = k.shape[1]
    seq_k = torch.cat([pair_k.transpose(1, 2), k[:, T - 1:]], dim=1)
    seq_v = torch.cat([pair_v.transpose(1, 2), torch.zeros_like(k[:, :1])], dim=1)
    return kernel(seq_k, seq_v, capacity)[:, seq_k.shape[1] - T:]
