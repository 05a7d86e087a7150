"""Linear recurrences h_t = a_t * h_{t-1} + b_t (DESIGN 2.1 selective scan, 2.2 leaky average).

The parallel form is ``jax.lax.associative_scan`` over time of the affine maps (a_t, b_t);
the initial state folds into the first map, so the final state is the last h. Accumulation is
float32 (float64 for float64 inputs); outputs are cast back to the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._base import acc_dtype, silu, softplus


def _compose(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


def linear_recurrence(log_a, b, h0):
    """log_a, b: [..., T]; h0: [...] -> (h for every t [..., T], h_T [...])."""
    if b.shape[-1] == 0:
        return jnp.zeros(h0.shape + (0,), h0.dtype), h0
    a = jnp.exp(log_a)
    b = b.at[..., 0].add(a[..., 0] * h0)
    _, h = jax.lax.associative_scan(_compose, (a, b), axis=b.ndim - 1)
    return h, h[..., -1]


def _expand_groups(M, Dc, lead: int):
    """[B, N, ...] -> [B, 1, N, ...]; grouped [B, G, N, ...] -> [B, Dc, N, ...]."""
    if M.ndim == lead:
        return M[:, None]
    G = M.shape[1]
    return jnp.repeat(M, Dc // G, axis=1)


def selective_scan_core(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """Validated arrays in the accumulation dtype -> (y [Bt, Dc, T], h_T)."""
    Dc = u.shape[1]
    dt = delta if delta_bias is None else delta + delta_bias[None, :, None]
    if delta_softplus:
        dt = softplus(dt)
    B = _expand_groups(B, Dc, 3)
    C = _expand_groups(C, Dc, 3)
    log_a = dt[:, :, None, :] * A[None, :, :, None]  # [Bt, Dc, N, T]
    b = (dt * u)[:, :, None, :] * B
    hs, hT = linear_recurrence(log_a, b, h0)
    y = jnp.sum(hs * C, axis=2)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * silu(z)
    return y, hT


def selective_step_core(h, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    Dc = u.shape[1]
    dt = delta if delta_bias is None else delta + delta_bias[None, :]
    if delta_softplus:
        dt = softplus(dt)
    B = _expand_groups(B, Dc, 2)
    C = _expand_groups(C, Dc, 2)
    h = jnp.exp(dt[:, :, None] * A[None]) * h + (dt * u)[:, :, None] * B
    y = jnp.sum(h * C, axis=2)
    if D is not None:
        y = y + D[None, :] * u
    if z is not None:
        y = y * silu(z)
    return y, h


def leaky_core(k, log_decay, h0):
    """k: [B, T, H, E] (accumulation dtype); log_decay: [H]; h0: [B, H, E] -> (kbar, h_T)."""
    b = jnp.transpose(k, (0, 2, 3, 1))  # [B, H, E, T]
    log_a = jnp.broadcast_to(log_decay[None, :, None, None], b.shape)
    hs, hT = linear_recurrence(log_a, b, h0)
    return jnp.transpose(hs, (0, 3, 1, 2)), hT


def leaky_step_core(k_t, log_decay, h):
    h = jnp.exp(log_decay)[None, :, None] * h + k_t
    return h, h


def as_acc(dtype, *arrays):
    acc = acc_dtype(dtype)
    return [None if a is None else jnp.asarray(a).astype(acc) for a in arrays]
