"""Linear recurrences h_t = a_t * h_{t-1} + b_t (DESIGN 2.1 selective scan, 2.2 leaky average).

The selective scan is two-level. Time is cut into nc chunks of L steps (the tail padded with
dt = 0, which leaves the state unchanged). One ``lax.scan`` walks the L positions of every chunk
at once from a zero state, forming exp(dt_t A) and x_t B_t per step and contracting
y_t = C_t . h_t inside it, so the [Bt, Dc, N, T] state is never built whole. A second
``lax.scan`` over the chunk summaries (decay, end state) gives each chunk's start state from h0,
and one fused pass adds C_t . (exp(A cumsum dt) * h_start). The leaky average keeps
``jax.lax.associative_scan`` (``linear_recurrence``): its state has no N axis, and there the
chunked form measured slower on CPU. Accumulation is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._base import acc_dtype, silu, softplus

MIN_CHUNK = 16
MAX_CHUNK = 32  # measured on CPU, mamba shapes: 32 beat 64 and 128 at T = 1024 and 4096


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


def chunk_len(T: int) -> int:
    """In-chunk length: about sqrt(T) as a power of two, within [MIN_CHUNK, MAX_CHUNK]."""
    L = 1 << max(0, round(math.log2(max(T, 1)) / 2))
    return max(MIN_CHUNK, min(MAX_CHUNK, L))


def _to_chunks(x, nc: int, L: int):
    """[..., T] -> [L, ..., nc], the tail padded with zeros."""
    pad = nc * L - x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return jnp.moveaxis(x.reshape(x.shape[:-1] + (nc, L)), -1, 0)


def _from_chunks(x, T: int):
    """[L, ..., nc] -> [..., T]."""
    x = jnp.moveaxis(x, 0, -1)
    return x.reshape(x.shape[:-2] + (-1,))[..., :T]


def _expand_groups(M, Dc, lead: int):
    """[B, N, ...] -> [B, 1, N, ...]; grouped [B, G, N, ...] -> [B, Dc, N, ...]."""
    if M.ndim == lead:
        return M[:, None]
    G = M.shape[1]
    return jnp.repeat(M, Dc // G, axis=1)


def _chunked_selective(dt, x, A, B, C, h0, L=None):
    """h_t = exp(dt_t A) h_{t-1} + x_t B_t and y_t = C_t . h_t, two-level (module docstring).

    dt, x: [Bt, Dc, T]; A: [Dc, N]; B, C: [Bt, (G,) N, T]. log a = dt A factorises, so the
    [Bt, Dc, N] terms are formed step by step from these small arrays and never stored whole
    (except what autodiff keeps for the backward pass)."""
    Dc, T = dt.shape[1], dt.shape[-1]
    L = chunk_len(T) if L is None else L
    nc = -(-T // L)
    dtc, xc = _to_chunks(dt, nc, L), _to_chunks(x, nc, L)  # [L, Bt, Dc, nc]
    Bc, Cc = _to_chunks(B, nc, L), _to_chunks(C, nc, L)  # [L, Bt, (G,) N, nc]
    An = A[None, :, :, None]  # [1, Dc, N, 1]

    def step(h, xs):
        dt_t, x_t, b_t, c_t = xs
        h = jnp.exp(dt_t[:, :, None] * An) * h + x_t[:, :, None] * _expand_groups(b_t, Dc, 3)
        return h, jnp.sum(_expand_groups(c_t, Dc, 3) * h, axis=2)

    Bt, N = dt.shape[0], A.shape[1]
    # Recomputing the step in the backward pass keeps only the carries, not exp(dt A) too.
    h_end, y = jax.lax.scan(jax.checkpoint(step), jnp.zeros((Bt, Dc, N, nc), h0.dtype),
                            (dtc, xc, Bc, Cc))
    cum = jnp.cumsum(dtc, axis=0)  # dt summed from chunk start through each t

    def carry(h, xs):
        total, end = xs
        return jnp.exp(total[:, :, None] * A[None]) * h + end, h

    hT, h_start = jax.lax.scan(carry, h0, (jnp.moveaxis(cum[-1], -1, 0),
                                           jnp.moveaxis(h_end, -1, 0)))
    h_start = jnp.moveaxis(h_start, 0, -1)  # [Bt, Dc, N, nc]
    Ce = jax.vmap(lambda c: _expand_groups(c, Dc, 3))(Cc)  # [L, Bt, Dc|1, N, nc]
    y = y + jnp.sum(Ce * jnp.exp(cum[:, :, :, None] * An[None]) * h_start[None], axis=3)
    return _from_chunks(y, T), hT


def selective_scan_core(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk=None):
    """Validated arrays in the accumulation dtype -> (y [Bt, Dc, T], h_T); ``chunk`` is the
    in-chunk length L (``chunk_len(T)`` if None)."""
    dt = delta if delta_bias is None else delta + delta_bias[None, :, None]
    if delta_softplus:
        dt = softplus(dt)
    if u.shape[-1] == 0:
        y, hT = jnp.zeros(u.shape, u.dtype), h0
    else:
        y, hT = _chunked_selective(dt, dt * u, A, B, C, h0, chunk)
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
