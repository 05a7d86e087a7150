"""Linear recurrences ``h_t = a_t h_{t-1} + b_t`` as a chunked scan (DESIGN 2.1, 2.2).

Within a chunk of L steps, ``h_t = sum_{s<=t} exp(c_t - c_s) b_s + exp(c_t) h_start`` with
``c`` the cumulative log-decay; the decay matrix is masked before the exponential (above the
diagonal ``c_t - c_s`` is positive and could overflow). Chunk end states follow the same closed
form one level up, over the chunks of a group; groups (bounded memory) run in a loop that
carries the state. Nothing loops over time. The leaky average uses it: its decay is shared by
batch and features, so the L x L matrix is small and the products are matrix multiplies.

The selective scan's decay differs per channel and state, where that matrix would cost L times
the O(T Dc N) work: it runs through ``ssm_scan`` instead.
"""

from __future__ import annotations

import torch
from memcore.spec.validate import check_leaky_args, check_scan_args

from . import dispatch
from ._util import NEG_INF, acc_dtype, softplus
from .ssm_scan import selective_scan_core

CHUNK = 16  # steps per chunk: the intra-chunk decay matrix is L x L per (batch, channel, state)
GROUP_ELEMENTS = 1 << 24  # decay-matrix elements per group of chunks (memory bound)


def _upper(L: int, device) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)


def _decay(cum):
    """exp(cum_t - cum_s) for s <= t, else 0: [..., L] -> [..., L, L]. Masked before the
    exponential; in place on the fresh difference (neither op needs its input for backward)."""
    diff = cum[..., :, None] - cum[..., None, :]
    return diff.masked_fill_(_upper(cum.shape[-1], cum.device), NEG_INF).exp_()


def _group(log_a, b, h0, L: int):
    """One group of whole chunks. log_a broadcastable to b [..., G*L]; h0 [...].
    Returns (h [..., G*L], h_end [...])."""
    G = b.shape[-1] // L
    la = log_a.reshape(*log_a.shape[:-1], G, L)
    bb = b.reshape(*b.shape[:-1], G, L)
    cum = la.cumsum(-1)  # [..., G, L]
    decay = _decay(cum)  # [..., G, L, L]
    # einsum, not matmul: a decay shared across batch/feature dims (the leaky average) is
    # then not expanded to b's full shape.
    h_in = torch.einsum("...ts,...s->...t", decay, bb)  # from a zero start, per chunk
    # Chunk level: H_g = exp(tot_g) H_{g-1} + end_g, with H_{-1} = h0.
    tot = cum[..., -1]
    ctot = tot.cumsum(-1)  # [..., G]
    end = h_in[..., -1]
    d2 = _decay(ctot)
    H = torch.einsum("...ts,...s->...t", d2, end) + torch.exp(ctot) * h0[..., None]
    h_prev = torch.cat([h0[..., None], H[..., :-1]], dim=-1)  # state before each chunk
    h = h_in + torch.exp(cum) * h_prev[..., None]
    return h.reshape(*h.shape[:-2], G * L), H[..., -1]


def linear_recurrence(log_a, b, h0, out_fn=None, chunk: int | None = None):
    """Parallel form of h_t = exp(log_a_t) h_{t-1} + b_t.

    log_a: broadcastable to b [..., T]; h0: [...] (b's leading shape). ``out_fn(h, t0, t1)``
    maps the states of steps t0..t1-1 to that slice of the output (default: the states).
    Returns (concatenated outputs, h_T).
    """
    T = b.shape[-1]
    chunk = CHUNK if chunk is None else chunk
    if T == 0:
        out = torch.zeros(*h0.shape, 0, dtype=h0.dtype, device=h0.device)
        return (out if out_fn is None else out_fn(out, 0, 0)), h0
    L = min(chunk, T)
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    if pad:
        # log a = 0 and b = 0 leave the state unchanged, so h_T is the padded end state.
        log_a = torch.nn.functional.pad(log_a, (0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
    per_chunk = max(1, b[..., 0].numel()) * L * L
    # Chunks per group: bounded by memory, and by L so that the chunk-level matrix
    # (G x G) costs no more than the intra-chunk ones (L x L per chunk).
    G = max(1, min(n_chunks, L, GROUP_ELEMENTS // per_chunk))
    outs, h = [], h0
    for g0 in range(0, n_chunks, G):
        s0, s1 = g0 * L, min(n_chunks, g0 + G) * L
        hs, h = _group(log_a[..., s0:s1], b[..., s0:s1], h, L)
        t1 = min(s1, T)
        hs = hs[..., :t1 - s0]
        outs.append(hs if out_fn is None else out_fn(hs, s0, t1))
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0], h


# --- 2.1 selective scan ----------------------------------------------------------------------

def _cast(dtype, *arrays):
    return [None if a is None else a.to(dtype) for a in arrays]


def _expand_streaming(M, Dc: int):
    if M.ndim == 2:
        return M[:, None]
    Bt, G, N = M.shape
    return M[:, :, None].expand(Bt, G, Dc // G, N).reshape(Bt, Dc, N)


def _time_first(M):
    """[Bt, N, T] or [Bt, G, N, T] -> [T, Bt, G, N], contiguous rows per position."""
    M = M[:, None] if M.ndim == 3 else M
    return M.permute(3, 0, 1, 2).contiguous()


def _softplus(x):
    # log(1 + e^x), fused; above the threshold it returns x, off by log1p(e^-40) ~ 4e-18
    # relative, far below every tolerance (the reference's formula takes seven kernels).
    return torch.nn.functional.softplus(x, threshold=40.0)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False):
    """mamba-ssm's ``selective_scan_fn`` plus ``initial_state`` / ``return_final_state``.

    u, delta, z: [Bt, Dc, T]; A: [Dc, N]; B, C: [Bt, N, T] or [Bt, G, N, T]; D, delta_bias:
    [Dc]; initial_state: [Bt, Dc, N]. Returns y [Bt, Dc, T] in u's dtype (and h_T in the
    accumulation dtype).

    The elementwise work runs time first ([T, Bt, Dc], contiguous): delta and z usually come
    out of a linear layer as transposed views of that layout, so reading them is free, and
    every elementwise kernel (and its backward) then walks contiguous memory.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, streaming=False)
    if u.shape[2] > 0 and dispatch.use_kernels(u):
        return dispatch.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                       initial_state, return_final_state)
    acc = acc_dtype(u.dtype)
    Bt, Dc, T = u.shape
    N = A.shape[1]
    h0 = (torch.zeros(Bt, Dc, N, dtype=acc, device=u.device) if initial_state is None
          else initial_state.to(acc))
    if T == 0:
        y = torch.zeros(Bt, Dc, 0, dtype=u.dtype, device=u.device)
        return (y, h0) if return_final_state else y

    def tf(a):  # [Bt, Dc, T] -> [T, Bt, Dc], contiguous
        return a.to(acc).permute(2, 0, 1).contiguous()

    u_ = tf(u)
    dt = tf(delta)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)
    if delta_softplus:
        dt = _softplus(dt)
    Bm, Cm = _time_first(B.to(acc)), _time_first(C.to(acc))
    G = Bm.shape[2]
    y, hT = selective_scan_core(dt.view(T, Bt, G, Dc // G), (dt * u_).view(T, Bt, G, Dc // G),
                                A.to(acc).reshape(G, Dc // G, N), Bm, Cm,
                                h0.reshape(Bt, G, Dc // G, N))
    y = y.reshape(T, Bt, Dc)
    if D is not None:
        y = torch.addcmul(y, u_, D.to(acc))
    if z is not None:
        y = y * torch.nn.functional.silu(tf(z))
    y = y.permute(1, 2, 0).to(u.dtype)
    hT = hT.reshape(Bt, Dc, N)
    return (y, hT) if return_final_state else y


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    """One token: state [Bt, Dc, N]; u, delta, z [Bt, Dc]; B, C [Bt, N] or [Bt, G, N].
    Returns (y [Bt, Dc] in u's dtype, new state in the accumulation dtype)."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, state, streaming=True)
    acc = acc_dtype(u.dtype)
    u_, dt, A_, B_, C_, D_, z_, db, h = _cast(acc, u, delta, A, B, C, D, z, delta_bias, state)
    Dc = u.shape[1]
    if db is not None:
        dt = dt + db[None, :]
    if delta_softplus:
        dt = softplus(dt)
    B_ = _expand_streaming(B_, Dc)
    C_ = _expand_streaming(C_, Dc)
    h = torch.exp(dt[:, :, None] * A_[None]) * h + (dt * u_)[:, :, None] * B_
    y = (h * C_).sum(2)
    if D_ is not None:
        y = y + D_[None, :] * u_
    if z_ is not None:
        y = y * torch.nn.functional.silu(z_)
    return y.to(u.dtype), h


# --- 2.2 leaky average -----------------------------------------------------------------------

def leaky_average(k, log_decay, initial_state=None, return_final_state=False):
    """kbar_t = k_t + exp(log_decay_h) kbar_{t-1}. k: [B, T, H, E]; log_decay: [H];
    initial_state: [B, H, E]. Returns kbar in k's dtype (and the final state)."""
    check_leaky_args(k, log_decay, initial_state, streaming=False)
    if k.shape[1] > 0 and dispatch.use_kernels(k):
        return dispatch.leaky_average(k, log_decay, initial_state, return_final_state)
    acc = acc_dtype(k.dtype)
    Bt, T, H, E = k.shape
    b = k.to(acc).permute(0, 2, 3, 1)  # [B, H, E, T]
    # One decay per head: the decay matrix is shared by batch and features.
    log_a = log_decay.to(acc)[None, :, None, None].expand(1, H, 1, T)
    h0 = (torch.zeros(Bt, H, E, dtype=acc, device=k.device) if initial_state is None
          else initial_state.to(acc))
    hs, hT = linear_recurrence(log_a, b, h0)
    y = hs.permute(0, 3, 1, 2).to(k.dtype)
    return (y, hT) if return_final_state else y


def leaky_average_step(k_t, log_decay, state):
    """k_t, state: [B, H, E] -> (kbar_t in k's dtype, new state)."""
    check_leaky_args(k_t, log_decay, state, streaming=True)
    acc = acc_dtype(k_t.dtype)
    h = torch.exp(log_decay.to(acc))[None, :, None] * state.to(acc) + k_t.to(acc)
    return h.to(k_t.dtype), h
