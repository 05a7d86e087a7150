"""The selective scan (DESIGN 2.1) and the linear recurrence ``h_t = a_t h_{t-1} + b_t`` that
the leaky average (2.2) shares.

``linear_recurrence``: a chunked scan, ``h_t = sum_{s<=t} exp(c_t - c_s) b_s + exp(c_t)
h_start`` within a chunk (c: the cumulative log-decay, masked before the exponential), the same
closed form one level up over chunks, groups of chunks (bounded memory) in a loop.

The selective scan's decay differs per channel and state, where that L x L matrix would cost L
times the O(T Dc N) work: a two-level scan over chunks of L ~ sqrt(T) steps instead (every
chunk from a zero start, vectorised over chunks; a loop over chunks for the entering states;
the first loop again from those, contracting each state with C_t as it is produced). Its
backward runs the adjoint ``g_t = C_t gy_t + a_{t+1} g_{t+1}`` in reverse with the same two
levels, recomputing states per group of chunks: memory O(T (Dc + N) + group), not autograd's
O(T Dc N). Core layout (time first): dt, w [T, Bt, G, Dg]; A [G, Dg, N]; Bm, Cm [T, Bt, G, N].

``selective_scan(..., implementation=)`` chooses the torch path, the Triton kernel, or
mamba-ssm's CUDA ``selective_scan_fn`` (``implementation.scan_path``).
"""

from __future__ import annotations

import math

import torch
from memcore.spec.validate import check_scan_args

from .implementation import scan_choice
from .numerics import NEG_INF, acc_dtype, all_finite, fast_softplus, silu
from .packed import check_cu_seqlens, doc_starts
from .selective_scan_bwd import backward_groups, restart, ssm_decay
from .selective_scan_step import selective_state_update  # noqa: F401 (the primitive's streaming form)

CHUNK = 16  # steps per chunk: the intra-chunk decay matrix is L x L per (batch, channel, state)
GROUP_ELEMENTS = 1 << 24  # decay-matrix elements per group of chunks (memory bound)


def _upper(L: int, device) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)


def _decay(cum, apart=None):
    """exp(cum_t - cum_s) for s <= t, else 0: [..., L] -> [..., L, L]. Masked before the
    exponential; in place on the fresh difference (neither op needs its input for backward).
    ``apart`` [..., L, L]: also 0 where t and s lie in different segments (documents)."""
    diff = cum[..., :, None] - cum[..., None, :]
    diff.masked_fill_(_upper(cum.shape[-1], cum.device), NEG_INF)
    return (diff if apart is None else diff.masked_fill_(apart, NEG_INF)).exp_()


def _causal_sum(decay, x, finite: bool, apart=None):
    """sum_{s<=t} decay[t, s] x_s over the last axis, where a non-finite x_s reaches only
    t >= s (``finite``: x is known to be finite): the decay matrix's zeros above the diagonal
    would make 0 * NaN = NaN at every earlier t, so non-finite inputs are zeroed for the
    product and every t at or after one is set to NaN (a cumulative sum of NaN where the
    input was not finite, 0 elsewhere; with segments ``apart``, only t in s's segment)."""
    # einsum, not matmul: a decay shared across batch/feature dims (the leaky average) is
    # then not expanded to x's full shape.
    if finite:
        return torch.einsum("...ts,...s->...t", decay, x)
    ok = torch.isfinite(x)
    y = torch.einsum("...ts,...s->...t", decay, torch.where(ok, x, 0.0))
    if apart is None:
        return y + torch.zeros_like(x).masked_fill_(~ok, math.nan).cumsum(-1)
    reach = ~(apart | _upper(x.shape[-1], x.device))
    hit = torch.einsum("...ts,...s->...t", reach.to(x.dtype), (~ok).to(x.dtype)) > 0
    return y.masked_fill(hit, math.nan)


def _segments(reset):
    """reset [..., L] bool -> (apart [..., L, L]: t and s in different segments, carry
    [..., L]: still in the segment that entered)."""
    rc = reset.cumsum(-1)
    return rc[..., :, None] != rc[..., None, :], rc == 0


def _group(log_a, b, h0, L: int, finite: bool, reset=None):
    """One group of whole chunks. log_a broadcastable to b [..., G*L]; h0 [...]; ``finite``:
    b is finite (then so are the chunks' end states, for inputs whose sums do not overflow).
    Returns (h [..., G*L], h_end [...])."""
    if reset is not None:
        return _segmented_group(log_a, b, h0, L, finite, reset)
    G = b.shape[-1] // L
    la = log_a.reshape(*log_a.shape[:-1], G, L)
    bb = b.reshape(*b.shape[:-1], G, L)
    cum = la.cumsum(-1)  # [..., G, L]
    decay = _decay(cum)  # [..., G, L, L]
    h_in = _causal_sum(decay, bb, finite)  # from a zero start, per chunk
    # Chunk level: H_g = exp(tot_g) H_{g-1} + end_g, with H_{-1} = h0.
    tot = cum[..., -1]
    ctot = tot.cumsum(-1)  # [..., G]
    end = h_in[..., -1]
    d2 = _decay(ctot)
    H = _causal_sum(d2, end, finite) + torch.exp(ctot) * h0[..., None]
    h_prev = torch.cat([h0[..., None], H[..., :-1]], dim=-1)  # state before each chunk
    h = h_in + torch.exp(cum) * h_prev[..., None]
    return h.reshape(*h.shape[:-2], G * L), H[..., -1]


def _segmented_group(log_a, b, h0, L: int, finite: bool, reset):
    """``_group`` where the state restarts from zero at ``reset`` [G*L] (bool): the decay
    matrices of both levels are cut between segments, and the entering state reaches only
    the positions before the first restart (selected, so another document's NaN stays out)."""
    G = b.shape[-1] // L
    la = log_a.reshape(*log_a.shape[:-1], G, L)
    bb = b.reshape(*b.shape[:-1], G, L)
    rs = reset.reshape(G, L)
    apart, carry = _segments(rs)
    cum = la.cumsum(-1)
    h_in = _causal_sum(_decay(cum, apart), bb, finite, apart)
    apart2, carry2 = _segments(rs.any(-1))  # a chunk with a restart forgets what entered it
    ctot = cum[..., -1].cumsum(-1)
    H = (_causal_sum(_decay(ctot, apart2), h_in[..., -1], finite, apart2)
         + torch.where(carry2, torch.exp(ctot) * h0[..., None], 0.0))
    h_prev = torch.cat([h0[..., None], H[..., :-1]], dim=-1)
    h = h_in + torch.where(carry, torch.exp(cum) * h_prev[..., None], 0.0)
    return h.reshape(*h.shape[:-2], G * L), H[..., -1]


def linear_recurrence(log_a, b, h0, out_fn=None, chunk: int | None = None, reset=None):
    """Parallel form of h_t = exp(log_a_t) h_{t-1} + b_t.

    log_a: broadcastable to b [..., T]; h0: [...] (b's leading shape). ``out_fn(h, t0, t1)``
    maps the states of steps t0..t1-1 to that slice of the output (default: the states).
    ``reset`` (bool [T]): the state restarts from zero there (a packed row's documents).
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
        if reset is not None:
            reset = torch.nn.functional.pad(reset, (0, pad))
    per_chunk = max(1, b[..., 0].numel()) * L * L
    # Chunks per group: bounded by memory, and by L so that the chunk-level matrix
    # (G x G) costs no more than the intra-chunk ones (L x L per chunk).
    G = max(1, min(n_chunks, L, GROUP_ELEMENTS // per_chunk))
    outs, h = [], h0
    finite = all_finite(b)
    for g0 in range(0, n_chunks, G):
        s0, s1 = g0 * L, min(n_chunks, g0 + G) * L
        hs, h = _group(log_a[..., s0:s1], b[..., s0:s1], h, L, finite,
                       None if reset is None else reset[s0:s1])
        t1 = min(s1, T)
        hs = hs[..., :t1 - s0]
        outs.append(hs if out_fn is None else out_fn(hs, s0, t1))
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0], h


# --- the two-level selective scan and its backward ----------------------------------

# Every buffer here stays well under glibc's largest mmap threshold (32 MiB): smaller blocks
# are reused from the heap, larger ones are mapped afresh on every call and pay a page fault
# per 4 KiB page, which costs more than the arithmetic.
SSM_GROUP_ELEMENTS = 1 << 23  # states kept at once by the backward (per group of chunks)
SAVE_ELEMENTS = 1 << 27  # decays kept from the forward for the backward, at most
LOG2E = 1.0 / math.log(2.0)


def _chunk_len(T: int) -> int:
    """About sqrt(T); a divisor of T within a factor 2 of it is preferred (no padding copy)."""
    if T <= 1:
        return 1
    root = math.isqrt(T - 1) + 1
    for d in sorted(range(max(1, root // 2), 2 * root + 1), key=lambda d: (abs(d - root), d)):
        if T % d == 0:
            return d
    return root


def _chunked(x, L: int, nC: int):
    """[T, ...] -> [nC, L, ...], zero padded at the end (a view when L divides T)."""
    pad = nC * L - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])], dim=0)
    return x.contiguous().view(nC, L, *x.shape[1:])


def _advance(h, a, w, Bm):
    """h <- a h + w B, in place. h, a [..., Dg, N]; w [..., Dg]; Bm [..., N]."""
    return h.mul_(a).addcmul_(w[..., None], Bm[..., None, :])


def _carry(tot, ends, h0, cut=None):
    """States entering each chunk: H_0 = h0, H_{c+1} = tot_c H_c + ends_c, or ends_c where
    ``cut`` [nC] (a document starts inside chunk c: its end forgets what entered it)."""
    H = torch.empty_like(ends)
    H[0] = h0
    for c in range(tot.shape[0] - 1):
        torch.addcmul(ends[c], tot[c], H[c], out=H[c + 1])
        if cut is not None:  # select, not multiply: H_c may hold another document's NaN
            torch.where(cut[c], ends[c], H[c + 1], out=H[c + 1])
    return H


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, w, A, Bm, Cm, h0, reset=None):
        T = dt.shape[0]
        L = _chunk_len(T)
        nC = -(-T // L)
        # dt = 0 (decay 1) and w = 0 leave the state unchanged over the padding.
        dtc, wc, Bc, Cc = (_chunked(x, L, nC) for x in (dt, w, Bm, Cm))
        rc = None if reset is None else _chunked(reset, L, nC)  # [nC, L]: documents start
        cut = None if rc is None else rc.any(1)
        with torch.no_grad():
            A2 = A * LOG2E
            tot = ssm_decay(dtc.sum(1), A2)  # decay over each whole chunk
            # One decay row per in-chunk position, kept for level 3 and the backward (within
            # SAVE_ELEMENTS), one block per row (see SSM_GROUP_ELEMENTS).
            save = nC * L * h0.numel() <= SAVE_ELEMENTS
            dec = [] if save else None
            buf = None if save else torch.empty_like(tot)

            def decay(l):
                if not save:
                    return ssm_decay(dtc[:, l], A2, out=buf)
                if len(dec) == l:
                    dec.append(ssm_decay(dtc[:, l], A2))
                return dec[l]

            # Level 1: every chunk from a zero start, all chunks at once.
            h = torch.zeros_like(tot)
            for l in range(L):
                _advance(restart(h, rc, l), decay(l), wc[:, l], Bc[:, l])
            H = _carry(tot, h, h0, cut)
            hT = torch.addcmul(h[-1], tot[-1], H[-1])
            if cut is not None:
                hT = torch.where(cut[-1], h[-1], hT)
            # Level 3: again from the true entering states, reading y_t = C_t . h_t out.
            h.copy_(H)
            y = dt.new_empty(nC, L, *dt.shape[1:])
            for l in range(L):
                _advance(restart(h, rc, l), decay(l), wc[:, l], Bc[:, l])
                # [1, N] @ [N, Dg]: this orientation runs several times faster than [Dg, N] @ [N, 1]
                y[:, l] = (Cc[:, l, ..., None, :] @ h.transpose(-1, -2))[..., 0, :]
        ctx.save_for_backward(dtc, wc, A, Bc, Cc, H, tot)
        ctx.decays = dec
        ctx.T = T
        ctx.rc, ctx.cut = rc, cut
        return y.view(nC * L, *dt.shape[1:])[:T], hT

    @staticmethod
    def backward(ctx, gy, ghT):
        dtc, wc, A, Bc, Cc, H, tot = ctx.saved_tensors
        dec, ctx.decays = ctx.decays, None
        rc, cut = ctx.rc, ctx.cut
        nC, L = dtc.shape[:2]
        T = ctx.T
        if gy is None:
            gy = dtc.new_zeros(T, *dtc.shape[2:])
        if ghT is None:
            ghT = torch.zeros_like(H[0])
        gyc = _chunked(gy, L, nC)
        with torch.no_grad():
            A2 = A * LOG2E
            # Level 1, reversed: e after position 0 of a chunk is a_0 g_0 from a zero end.
            e = torch.zeros_like(H)
            buf = None if dec is not None else torch.empty_like(H)
            for l in range(L - 1, -1, -1):
                a = dec[l] if dec is not None else ssm_decay(dtc[:, l], A2, out=buf)
                restart(e.addcmul_(gyc[:, l, ..., None], Cc[:, l, ..., None, :]).mul_(a), rc, l)
            # Level 2: E_c, the adjoint arriving at the end of chunk c from later chunks.
            E = torch.empty_like(H)
            E[-1] = ghT
            for c in range(nC - 1, 0, -1):
                torch.addcmul(e[c], tot[c], E[c], out=E[c - 1])
                if cut is not None:  # nothing after a document's start reaches before it
                    torch.where(cut[c], e[c], E[c - 1], out=E[c - 1])
            gh0 = torch.addcmul(e[0], tot[0], E[0])
            if cut is not None:
                gh0 = torch.where(cut[0], e[0], gh0)
            del e
            grads = backward_groups(dec, dtc, wc, A, A2, Bc, Cc, H, E, gyc, SSM_GROUP_ELEMENTS,
                                    rc)
        gdt, gw, gA, gB, gC = grads
        return (_unchunk(gdt, T), _unchunk(gw, T), gA, _unchunk(gB, T), _unchunk(gC, T), gh0,
                None)


def _unchunk(x, T: int):
    nC, L = x.shape[:2]
    return x.view(nC * L, *x.shape[2:])[:T]


def selective_scan_core(dt, w, A, Bm, Cm, h0, reset=None):
    """y [T, Bt, G, Dg] and h_T [Bt, G, Dg, N]; differentiable in every argument. ``reset``
    (bool [T]): the state restarts from zero there (a packed row's document starts)."""
    return _SelectiveScan.apply(dt, w, A, Bm, Cm, h0, reset)


# --- 2.1 selective scan ----------------------------------------------------------------------

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, cu_seqlens=None, *,
                   implementation="auto"):
    """mamba-ssm's ``selective_scan_fn`` plus ``initial_state`` / ``return_final_state``.

    u, delta, z: [Bt, Dc, T]; A: [Dc, N]; B, C: [Bt, N, T] or [Bt, G, N, T]; D, delta_bias:
    [Dc]; initial_state: [Bt, Dc, N]. Returns y [Bt, Dc, T] in u's dtype (and h_T in the
    accumulation dtype). ``cu_seqlens`` (int32 [N + 1], Bt = 1): the state restarts from
    zero at every document (mamba-ssm's kernel takes no boundaries: such a call runs on the
    Triton kernel or the torch path); h_T is the last document's.

    The torch path's elementwise work runs time first ([T, Bt, Dc], contiguous): delta and z
    usually come out of a linear layer as transposed views of that layout, so reading them is
    free, and every elementwise kernel (and its backward) then walks contiguous memory.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, streaming=False)
    bounds = check_cu_seqlens(cu_seqlens, u.shape[2], u.shape[0], initial_state,
                              "selective_scan")
    path = scan_choice(implementation, u, initial_state, packed=bounds is not None)
    if path != "torch" and bounds is not None:
        from memcore.kernels.triton.selective_scan import selective_scan as kernel

        return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                      delta_softplus=delta_softplus, return_final_state=return_final_state,
                      reset=doc_starts(bounds, u.device))
    if path != "torch":
        if path == "mamba_ssm":
            from memcore.kernels.triton.selective_scan_mamba_ssm import selective_scan as kernel
        else:
            from memcore.kernels.triton.selective_scan import selective_scan as kernel
        return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                      delta_softplus=delta_softplus, initial_state=initial_state,
                      return_final_state=return_final_state)
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
        dt = fast_softplus(dt)
    Bm, Cm = _time_first(B.to(acc)), _time_first(C.to(acc))
    G = Bm.shape[2]
    y, hT = selective_scan_core(dt.view(T, Bt, G, Dc // G), (dt * u_).view(T, Bt, G, Dc // G),
                                A.to(acc).reshape(G, Dc // G, N), Bm, Cm,
                                h0.reshape(Bt, G, Dc // G, N),
                                None if bounds is None else doc_starts(bounds, u.device))
    y = y.reshape(T, Bt, Dc)
    if D is not None:
        y = torch.addcmul(y, u_, D.to(acc))
    if z is not None:
        y = y * silu(tf(z))
    y = y.permute(1, 2, 0).to(u.dtype)
    hT = hT.reshape(Bt, Dc, N)
    return (y, hT) if return_final_state else y


def _time_first(M):
    """[Bt, N, T] or [Bt, G, N, T] -> [T, Bt, G, N], contiguous rows per position."""
    M = M[:, None] if M.ndim == 3 else M
    return M.permute(3, 0, 1, 2).contiguous()
