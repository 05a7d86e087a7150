"""The leaky average (DESIGN 2.2): ``kbar_t = k_t + exp(log_decay_h) kbar_{t-1}`` per head,
the time-invariant special case of the selective scan's recurrence (its chunked scan), or the
Triton kernel."""

from __future__ import annotations

import torch
from memcore.spec.validate import check_leaky_args

from .implementation import choose
from .numerics import acc_dtype
from .packed import check_cu_seqlens, doc_starts
from .selective_scan import linear_recurrence


def leaky_average(k, log_decay, initial_state=None, return_final_state=False, cu_seqlens=None,
                  *, implementation="auto"):
    """k: [B, T, H, E]; log_decay: [H]; initial_state: [B, H, E]. Returns kbar in k's dtype
    (and the final state in the accumulation dtype). ``cu_seqlens`` (int32 [N + 1], B = 1):
    the average restarts at every document (the kernel takes the documents' starts as
    ``reset``), and the final state is the last document's."""
    check_leaky_args(k, log_decay, initial_state, streaming=False)
    bounds = check_cu_seqlens(cu_seqlens, k.shape[1], k.shape[0], initial_state,
                              "leaky_average")
    unserved = "an empty sequence (T = 0)" if k.shape[1] == 0 else None
    reset = None if bounds is None else doc_starts(bounds, k.device)
    if choose("leaky_average", implementation, k, unserved) == "triton":
        from memcore.kernels.triton.leaky_average import leaky_average as kernel

        return kernel(k, log_decay, initial_state=initial_state,
                      return_final_state=return_final_state, reset=reset)
    acc = acc_dtype(k.dtype)
    Bt, T, H, E = k.shape
    b = k.to(acc).permute(0, 2, 3, 1)  # [B, H, E, T]
    # One decay per head: the decay matrix is shared by batch and features.
    log_a = log_decay.to(acc)[None, :, None, None].expand(1, H, 1, T)
    h0 = (torch.zeros(Bt, H, E, dtype=acc, device=k.device) if initial_state is None
          else initial_state.to(acc))
    hs, hT = linear_recurrence(log_a, b, h0, reset=reset)
    y = hs.permute(0, 3, 1, 2).to(k.dtype)
    return (y, hT) if return_final_state else y


def leaky_average_step(k_t, log_decay, state, *, inplace: bool = False):
    """k_t, state: [B, H, E] -> (kbar_t in k's dtype, new state). With ``inplace`` (arguments
    in the accumulation dtype, ``state`` a buffer of its own) ``state`` itself is updated and
    is both results."""
    if inplace:
        state.mul_(torch.exp(log_decay)[None, :, None]).add_(k_t)
        return state, state
    check_leaky_args(k_t, log_decay, state, streaming=True)
    acc = acc_dtype(k_t.dtype)
    h = torch.exp(log_decay.to(acc))[None, :, None] * state.to(acc) + k_t.to(acc)
    return h.to(k_t.dtype), h
