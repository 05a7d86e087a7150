"""Leaky average (DESIGN 2.2): kbar_t = k_t + exp(log_decay_h) kbar_{t-1}, per head.

A time-invariant special case of the selective scan's recurrence (``linear_recurrence``). It
has no Pallas kernel: ``implementation`` accepts "auto" and "jax"; "pallas" raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from memcore.spec.validate import check_leaky_args

from . import implementation as impl
from .numerics import acc_dtype, as_acc
from .packed import check_cu_seqlens, doc_positions
from .selective_scan import linear_recurrence


def leaky_core(k, log_decay, h0, reset=None):
    """k: [B, T, H, E] (accumulation dtype); log_decay: [H]; h0: [B, H, E] -> (kbar, h_T).
    ``reset`` [T] bool: the average restarts there."""
    b = jnp.transpose(k, (0, 2, 3, 1))  # [B, H, E, T]
    log_a = jnp.broadcast_to(log_decay[None, :, None, None], b.shape)
    hs, hT = linear_recurrence(log_a, b, h0, reset)
    return jnp.transpose(hs, (0, 3, 1, 2)), hT


def leaky_step_core(k_t, log_decay, h):
    h = jnp.exp(log_decay)[None, :, None] * h + k_t
    return h, h


_leaky_jit = jax.jit(leaky_core)
_leaky_step_jit = jax.jit(leaky_step_core)


def leaky_average(k, log_decay, initial_state=None, return_final_state=False, cu_seqlens=None,
                  *, implementation="auto"):
    """kbar_t = k_t + exp(log_decay_h) kbar_{t-1}; k [B, T, H, E], log_decay [H].
    ``cu_seqlens`` (int32 [N + 1], B = 1; boundaries may be traced): the average restarts at
    every document; the final state is the last document's."""
    impl.plain_only("leaky_average", implementation)
    check_leaky_args(k, log_decay, initial_state, streaming=False)
    B, T, H, E = k.shape
    cu = check_cu_seqlens(cu_seqlens, T, B, initial_state, "leaky_average")
    h0 = jnp.zeros((B, H, E), acc_dtype(k.dtype)) if initial_state is None else initial_state
    kk, ld, h0 = as_acc(k.dtype, k, log_decay, h0)
    y, hT = _leaky_jit(kk, ld, h0, None if cu is None else doc_positions(cu, T) == 0)
    y = y.astype(k.dtype)
    return (y, hT) if return_final_state else y


def leaky_average_step(k_t, log_decay, state):
    """One step: k_t [B, H, E], state [B, H, E] -> (kbar_t, state)."""
    check_leaky_args(k_t, log_decay, state, streaming=True)
    kk, ld, h = as_acc(k_t.dtype, k_t, log_decay, state)
    y, h = _leaky_step_jit(kk, ld, h)
    return y.astype(k_t.dtype), h
