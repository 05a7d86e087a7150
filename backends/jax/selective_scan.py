"""Selective scan (DESIGN 2.1) and the linear recurrence h_t = a_t * h_{t-1} + b_t it shares
with the leaky average (2.2).

The plain-JAX scan is two-level and differentiated by hand: ``selective_scan_vjp.fused_scan``
(a ``jax.custom_vjp``; its module docstring has the levels). ``autodiff_core`` is the same
two-level forward left to JAX autodiff (chunk walks under ``jax.checkpoint``): the backward it
replaced, kept as the independent check of the hand-written one. ``linear_recurrence`` keeps
``jax.lax.associative_scan``: the leaky average's state has no N axis, and there the chunked
form measured slower on CPU. Accumulation is float32 (float64 for float64 inputs).
``implementation="pallas"`` runs ``memcore.kernels.pallas.selective_scan`` (a packed row's
restarts passed as its ``reset`` flags).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from memcore.spec.validate import check_scan_args

from . import implementation as impl
from .numerics import acc_dtype, as_acc, silu, softplus
from .packed import check_cu_seqlens, doc_positions
from .selective_scan_vjp import fused_scan

MIN_CHUNK = 16
MAX_CHUNK = 64  # measured on CPU, mamba fwd+bwd: 64 beat 16, 32 and 128 at T = 1024 and 4096


def _compose(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


def _compose_reset(first, second):
    """``_compose`` of segments: a later segment that restarts (r) forgets the earlier one,
    selected (a zero decay times another document's NaN would be NaN)."""
    a1, b1, r1 = first
    a2, b2, r2 = second
    return (jnp.where(r2, a2, a1 * a2), jnp.where(r2, b2, a2 * b1 + b2), r1 | r2)


def linear_recurrence(log_a, b, h0, reset=None):
    """log_a, b: [..., T]; h0: [...] -> (h for every t [..., T], h_T [...]). ``reset`` [T]
    bool: the state restarts from zero there (h_t = b_t)."""
    if b.shape[-1] == 0:
        return jnp.zeros(h0.shape + (0,), h0.dtype), h0
    a = jnp.exp(log_a)
    if reset is None:
        b = b.at[..., 0].add(a[..., 0] * h0)
        _, h = jax.lax.associative_scan(_compose, (a, b), axis=b.ndim - 1)
        return h, h[..., -1]
    b = b.at[..., 0].set(jnp.where(reset[0], b[..., 0], b[..., 0] + a[..., 0] * h0))
    r = jnp.broadcast_to(reset, b.shape)
    _, h, _ = jax.lax.associative_scan(_compose_reset, (a, b, r), axis=b.ndim - 1)
    return h, h[..., -1]


def chunk_len(T: int) -> int:
    """In-chunk length: about 2 sqrt(T) as a power of two, within [MIN_CHUNK, MAX_CHUNK]."""
    L = 1 << max(0, round(math.log2(max(T, 1)) / 2) + 1)
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


def expand_groups(M, Dc, lead: int):
    """[B, N, ...] -> [B, 1, N, ...]; grouped [B, G, N, ...] -> [B, Dc, N, ...]."""
    if M.ndim == lead:
        return M[:, None]
    G = M.shape[1]
    return jnp.repeat(M, Dc // G, axis=1)


def _chunked_selective(dt, x, A, B, C, h0, L=None):
    """h_t = exp(dt_t A) h_{t-1} + x_t B_t and y_t = C_t . h_t, two-level (module docstring).

    dt, x: [Bt, Dc, T]; A: [Dc, N]; B, C: [Bt, (G,) N, T]. log a = dt A factorises, so the
    [Bt, Dc, N] terms are formed step by step from these small arrays and never stored whole."""
    Dc, T = dt.shape[1], dt.shape[-1]
    L = chunk_len(T) if L is None else L
    nc = -(-T // L)
    dtc, xc = _to_chunks(dt, nc, L), _to_chunks(x, nc, L)  # [L, Bt, Dc, nc]
    Bc, Cc = _to_chunks(B, nc, L), _to_chunks(C, nc, L)  # [L, Bt, (G,) N, nc]
    An = A[None, :, :, None]  # [1, Dc, N, 1]

    def advance(h, dt_t, x_t, b_t):
        return jnp.exp(dt_t[:, :, None] * An) * h + x_t[:, :, None] * expand_groups(b_t, Dc, 3)

    def end_step(h, xs):
        return advance(h, *xs), None

    def out_step(h, xs):
        *ab, c_t = xs
        h = advance(h, *ab)
        return h, jnp.sum(expand_groups(c_t, Dc, 3) * h, axis=2)

    # Both walks recompute their step in the backward pass, keeping only the carries.
    Bt, N = dt.shape[0], A.shape[1]
    h_end, _ = jax.lax.scan(jax.checkpoint(end_step), jnp.zeros((Bt, Dc, N, nc), h0.dtype),
                            (dtc, xc, Bc))

    def carry(h, xs):
        total, end = xs
        return jnp.exp(total[:, :, None] * A[None]) * h + end, h

    hT, h_start = jax.lax.scan(carry, h0, (jnp.moveaxis(jnp.sum(dtc, axis=0), -1, 0),
                                           jnp.moveaxis(h_end, -1, 0)))
    # The second walk starts every chunk from its true state, so y needs no correction term
    # (a correction exp(A cumsum dt) * h_start measured slower: its gradient is a full pass).
    _, y = jax.lax.scan(jax.checkpoint(out_step), jnp.moveaxis(h_start, 0, -1), (dtc, xc, Bc, Cc))
    return _from_chunks(y, T), hT


def scan_core(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk=None, reset=None):
    """Validated arrays in the accumulation dtype -> (y [Bt, Dc, T], h_T); ``chunk`` is the
    in-chunk length L (``chunk_len(T)`` if None); ``reset`` [T] bool: the state restarts
    from zero there (None: nowhere). Gradients: the hand-written backward."""
    T = u.shape[-1]
    if T == 0:
        return jnp.zeros(u.shape, u.dtype), h0
    L = chunk_len(T) if chunk is None else chunk
    return fused_scan(u, delta, A, B, C, D, z, delta_bias, h0, reset, bool(delta_softplus), L)


def autodiff_core(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk=None):
    """``scan_core`` with JAX autodiff's backward through the chunk walks."""
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


def step_core(h, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    Dc = u.shape[1]
    dt = delta if delta_bias is None else delta + delta_bias[None, :]
    if delta_softplus:
        dt = softplus(dt)
    B = expand_groups(B, Dc, 2)
    C = expand_groups(C, Dc, 2)
    h = jnp.exp(dt[:, :, None] * A[None]) * h + (dt * u)[:, :, None] * B
    y = jnp.sum(h * C, axis=2)
    if D is not None:
        y = y + D[None, :] * u
    if z is not None:
        y = y * silu(z)
    return y, h


# Each op runs as one compiled computation (cached per shape) rather than op by op.
_scan_jit = jax.jit(scan_core, static_argnums=(8,))
_step_jit = jax.jit(step_core, static_argnums=(9,))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, cu_seqlens=None, *,
                   implementation="auto"):
    """mamba-ssm's ``selective_scan_fn`` plus an initial state (see the reference).
    ``cu_seqlens`` (int32 [N + 1], Bt = 1; boundaries may be traced): the state restarts from
    zero at every document; h_T is the last document's."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, streaming=False)
    cu = check_cu_seqlens(cu_seqlens, u.shape[-1], u.shape[0], initial_state, "selective_scan")
    empty = "the sequence is empty (T = 0)" if u.shape[-1] == 0 else None
    choice = impl.choose("selective_scan", implementation, u, unserved=empty)
    Bt, Dc, _ = u.shape
    acc = acc_dtype(u.dtype)
    h0 = jnp.zeros((Bt, Dc, A.shape[1]), acc) if initial_state is None else initial_state
    # a packed row restarts at each document's first token
    reset = None if cu is None else doc_positions(cu, u.shape[-1]) == 0
    if choice == "pallas":
        from memcore.kernels.pallas.selective_scan import selective_scan as kernel

        y, hT = kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                       delta_softplus=delta_softplus, initial_state=h0, return_final_state=True,
                       reset=reset, interpret=impl.interpret(u))
    else:
        args = as_acc(u.dtype, u, delta, A, B, C, D, z, delta_bias, h0)
        y, hT = _scan_jit(*args[:8], bool(delta_softplus), args[8], None, reset)
        y = y.astype(u.dtype)
    return (y, hT) if return_final_state else y


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    """One step: state [Bt, Dc, N], u, delta, z [Bt, Dc], B, C [Bt, (G,) N] -> (y, state)."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, state, streaming=True)
    h, *args = as_acc(u.dtype, state, u, delta, A, B, C, D, z, delta_bias)
    y, h = _step_jit(h, *args, bool(delta_softplus))
    return y.astype(u.dtype), h
