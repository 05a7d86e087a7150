"""The leaky average (DESIGN 2.2): Memory Mosaics' key extractor, a time-invariant linear
recurrence with one decay per head (the selective scan's machinery with N = 1)."""

from __future__ import annotations

from ..validate import check_leaky_args
from .numerics import acc_dtype, cast_out, device, namespace
from .packed import check_cu_seqlens, doc_starts
from .selective_scan import linear_recurrence, linear_recurrence_step

__all__ = ["leaky_average", "leaky_average_step"]


def leaky_average(k, log_decay, initial_state=None, return_final_state=False, cu_seqlens=None):
    """kbar_t = k_t + exp(log_decay_h) kbar_{t-1}.

    k: [B, T, H, E]; log_decay: [H] (Memory Mosaics: -10 |p_h|); initial_state: [B, H, E].
    Returns kbar [B, T, H, E] in k's dtype (and the final state in the accumulation dtype).
    ``cu_seqlens`` (int32 [N + 1], B = 1): the average restarts at every document.
    """
    xp = namespace(k, log_decay)
    check_leaky_args(k, log_decay, initial_state, streaming=False)
    bounds = check_cu_seqlens(cu_seqlens, k.shape[1], k.shape[0], initial_state,
                              "leaky_average")
    acc = acc_dtype(xp, k.dtype)
    Bt, T, H, E = k.shape
    b = xp.permute_dims(xp.astype(k, acc), (0, 2, 3, 1))  # [B, H, E, T]
    log_a = xp.broadcast_to(xp.astype(log_decay, acc)[None, :, None, None], (Bt, H, E, T))
    h0 = (xp.zeros((Bt, H, E), dtype=acc, device=device(k)) if initial_state is None
          else xp.astype(initial_state, acc))
    reset = None if bounds is None else doc_starts(xp, bounds, k)
    hs, hT = linear_recurrence(xp, log_a, b, h0, reset=reset)
    y = cast_out(xp, xp.permute_dims(hs, (0, 3, 1, 2)), k.dtype)
    return (y, hT) if return_final_state else y


def leaky_average_step(k_t, log_decay, state):
    """Streaming form: k_t [B, H, E], state [B, H, E] -> (kbar_t in k's dtype, new state)."""
    xp = namespace(k_t, log_decay, state)
    check_leaky_args(k_t, log_decay, state, streaming=True)
    acc = acc_dtype(xp, k_t.dtype)
    h = linear_recurrence_step(xp, xp.astype(log_decay, acc)[None, :, None],
                               xp.astype(k_t, acc), xp.astype(state, acc))
    return cast_out(xp, h, k_t.dtype), h
