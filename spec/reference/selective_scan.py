"""The selective scan (DESIGN 2.1) and the linear recurrence it is made of.

``h_t = a_t * h_{t-1} + b_t`` elementwise; the leaky average (2.2) imports the same
recurrence. The parallel form evaluates it chunk by chunk in closed form,
``h_t = sum_{s<=t} exp(sum_{s<r<=t} log a_r) b_s + exp(sum_{r<=t} log a_r) h_0``, with a
dense lower-triangular decay matrix per chunk; the streaming form applies one step.
The two share no code beyond the parameterisation, so agreement between them is a real check.
"""

from __future__ import annotations

import math

from ..validate import check_scan_args
from .numerics import acc_dtype, cast_out, device, namespace, silu, softplus
from .packed import check_cu_seqlens, doc_starts

__all__ = ["selective_scan", "selective_state_update", "linear_recurrence",
           "linear_recurrence_step"]

SCAN_CHUNK = 16  # chunk of the closed form; any value gives the same result


def linear_recurrence(xp, log_a, b, h0, chunk: int = SCAN_CHUNK, reset=None):
    """Parallel form. log_a, b: [..., T]; h0: [...]. Returns (h for every t [..., T], h_T).

    ``reset`` (bool [T], packed sequences): where True the state restarts, h_t = b_t, as if
    the recurrence began there from a zero state.
    """
    if reset is not None:
        return _segmented_recurrence(xp, log_a, b, h0, chunk, reset)
    T = b.shape[-1]
    outs = []
    h = h0
    for s in range(0, T, chunk):
        la = log_a[..., s:s + chunk]
        bb = b[..., s:s + chunk]
        L = la.shape[-1]
        cum = xp.cumulative_sum(la, axis=-1)  # [..., L]
        diff = cum[..., :, None] - cum[..., None, :]  # [..., L(t), L(s)]
        idx = xp.arange(L, device=device(b))
        lower = idx[:, None] >= idx[None, :]
        # Mask before exp: above the diagonal diff is positive and could overflow.
        decay = xp.where(lower, xp.exp(xp.where(lower, diff, xp.zeros_like(diff))),
                         xp.zeros_like(diff))
        # The decay matrix is zero above the diagonal, and 0 * NaN = NaN would carry a later
        # non-finite b into earlier rows: zero such b instead, and mark the rows from it on.
        bad = ~xp.isfinite(bb)
        hs = (xp.matmul(decay, xp.where(bad, xp.zeros_like(bb), bb)[..., :, None])[..., 0]
              + xp.exp(cum) * h[..., None])
        hit = xp.cumulative_sum(xp.astype(bad, hs.dtype), axis=-1) > 0
        hs = xp.where(hit, xp.asarray(math.nan, dtype=hs.dtype, device=device(hs)), hs)
        outs.append(hs)
        h = hs[..., -1]
    if not outs:
        return xp.zeros(tuple(h0.shape) + (0,), dtype=h0.dtype, device=device(h0)), h0
    return xp.concat(outs, axis=-1), h


def _segmented_recurrence(xp, log_a, b, h0, chunk: int, reset):
    """``linear_recurrence`` with restarts: the closed form restricted to pairs (t, s) of one
    segment (no reset in (s, t]). Log-decay sums run within segments and leave out the log a
    of a restart (the state it would decay is dropped), and every mask selects with
    ``where``, so a non-finite value reaches nothing outside its own segment."""
    T = b.shape[-1]
    outs = []
    h = h0
    nan = xp.asarray(math.nan, dtype=b.dtype, device=device(b))
    for s in range(0, T, chunk):
        bb = b[..., s:s + chunk]
        L = bb.shape[-1]
        la = xp.broadcast_to(log_a[..., s:s + chunk], tuple(bb.shape))
        rs = reset[s:s + L]
        rc = xp.cumulative_sum(xp.astype(rs, xp.int64))  # segment index within the chunk
        idx = xp.arange(L, device=device(b))
        same = (idx[:, None] >= idx[None, :]) & (rc[:, None] == rc[None, :])  # [L(t), L(s)]
        zero = xp.zeros_like(la)
        cum = xp.sum(xp.where(same & ~rs[None, :], la[..., None, :], zero[..., None, :]),
                     axis=-1)
        diff = cum[..., :, None] - cum[..., None, :]
        decay = xp.where(same, xp.exp(xp.where(same, diff, xp.zeros_like(diff))),
                         xp.zeros_like(diff))
        bad = ~xp.isfinite(bb)
        hs = xp.matmul(decay, xp.where(bad, zero, bb)[..., :, None])[..., 0]
        carry = rc == 0  # rows still in the segment that entered the chunk
        hs = hs + xp.where(carry, xp.exp(xp.where(carry, cum, zero)) * h[..., None], zero)
        hs = xp.where(xp.any(same & bad[..., None, :], axis=-1), nan, hs)
        outs.append(hs)
        h = hs[..., -1]
    return xp.concat(outs, axis=-1), h


def linear_recurrence_step(xp, log_a, b, h):
    """Streaming form: one step of h = exp(log_a) * h + b."""
    return xp.exp(log_a) * h + b


def _as(xp, dtype, *arrays):
    return [None if a is None else xp.astype(a, dtype) for a in arrays]


def _expand_groups(xp, M, Dc, streaming: bool):
    plain = 2 if streaming else 3
    if M.ndim == plain:
        return M[:, None, ...]
    Bt, G = M.shape[0], M.shape[1]
    rest = tuple(M.shape[2:])
    M = xp.broadcast_to(M[:, :, None, ...], (Bt, G, Dc // G) + rest)
    return xp.reshape(M, (Bt, Dc) + rest)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, cu_seqlens=None):
    """mamba-ssm's ``selective_scan_fn`` plus an initial state, on any Array API library.

    u, delta, z: [Bt, Dc, T]; A: [Dc, N]; B, C: [Bt, N, T] or [Bt, G, N, T]; D, delta_bias: [Dc];
    initial_state: [Bt, Dc, N] (zeros if None). Returns y [Bt, Dc, T] in u's dtype, and with
    ``return_final_state`` also h_T [Bt, Dc, N] in the accumulation dtype.
    ``cu_seqlens`` (int32 [N + 1], Bt = 1; see ``packed``): the state restarts from zero at
    every document, and h_T is the last document's.
    """
    xp = namespace(u, delta, A, B, C)
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, streaming=False)
    bounds = check_cu_seqlens(cu_seqlens, u.shape[2], u.shape[0], initial_state,
                              "selective_scan")
    out_dtype = u.dtype
    acc = acc_dtype(xp, u.dtype)
    u_, dt, A_, B_, C_, D_, z_, db = _as(xp, acc, u, delta, A, B, C, D, z, delta_bias)
    Bt, Dc, T = u.shape
    N = A.shape[1]
    if db is not None:
        dt = dt + db[None, :, None]
    if delta_softplus:
        dt = softplus(xp, dt)
    B_ = _expand_groups(xp, B_, Dc, streaming=False)  # [Bt, Dc|1, N, T]
    C_ = _expand_groups(xp, C_, Dc, streaming=False)
    log_a = dt[:, :, None, :] * A_[None, :, :, None]  # [Bt, Dc, N, T]
    b = (dt * u_)[:, :, None, :] * B_
    h0 = (xp.zeros((Bt, Dc, N), dtype=acc, device=device(u)) if initial_state is None
          else xp.astype(initial_state, acc))
    reset = None if bounds is None else doc_starts(xp, bounds, u)
    hs, hT = linear_recurrence(xp, log_a, b, h0, reset=reset)
    y = xp.sum(hs * C_, axis=2)
    if D_ is not None:
        y = y + D_[None, :, None] * u_
    if z_ is not None:
        y = y * silu(xp, z_)
    y = cast_out(xp, y, out_dtype)
    return (y, hT) if return_final_state else y


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    """Streaming form of ``selective_scan``: one token.

    state: [Bt, Dc, N]; u, delta, z: [Bt, Dc]; B, C: [Bt, N] or [Bt, G, N].
    Returns (y [Bt, Dc] in u's dtype, new state in the accumulation dtype).
    """
    xp = namespace(state, u, delta, A, B, C)
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, state, streaming=True)
    acc = acc_dtype(xp, u.dtype)
    u_, dt, A_, B_, C_, D_, z_, db, h = _as(xp, acc, u, delta, A, B, C, D, z, delta_bias, state)
    Dc = u.shape[1]
    if db is not None:
        dt = dt + db[None, :]
    if delta_softplus:
        dt = softplus(xp, dt)
    B_ = _expand_groups(xp, B_, Dc, streaming=True)  # [Bt, Dc|1, N]
    C_ = _expand_groups(xp, C_, Dc, streaming=True)
    h = linear_recurrence_step(xp, dt[:, :, None] * A_[None], (dt * u_)[:, :, None] * B_, h)
    y = xp.sum(h * C_, axis=2)
    if D_ is not None:
        y = y + D_[None, :] * u_
    if z_ is not None:
        y = y * silu(xp, z_)
    return cast_out(xp, y, u.dtype), h
