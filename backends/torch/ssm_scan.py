"""Selective scan ``h_t = exp(dt_t A) h_{t-1} + w_t B_t``, ``y_t = C_t . h_t`` in O(T Dc N).

Two levels over chunks of L steps (L about sqrt(T), a divisor of T when one is close):

1. a loop over the L positions of a chunk that advances every chunk at once from a zero start
   (vectorised over the T/L chunks), keeping only each chunk's end state;
2. a loop over the chunks for the carries: the state entering each chunk;
3. the first loop again from the true entering states, contracting each state with C_t as it
   is produced, so the full [T, Dc, N] state is never stored.

The backward is the same recurrence run in reverse (the adjoint ``g_t = C_t gy_t +
a_{t+1} g_{t+1}``), with the same two levels; states are recomputed per group of chunks from
the saved entering states, so memory stays O(T (Dc + N) + group) instead of autograd's
O(T Dc N) per intermediate.

Layout (time first): dt, w [T, Bt, G, Dg]; A [G, Dg, N]; Bm, Cm [T, Bt, G, N];
h0 [Bt, G, Dg, N]. Time is viewed as [chunks, L] without a copy: position l of every chunk is
a strided slice whose rows (Bt G Dg values) stay contiguous.
"""

from __future__ import annotations

import math

import torch

# Every buffer here stays well under glibc's largest mmap threshold (32 MiB): smaller blocks
# are reused from the heap, larger ones are mapped afresh on every call and pay a page fault
# per 4 KiB page, which costs more than the arithmetic.
GROUP_ELEMENTS = 1 << 23  # states kept at once by the backward (per group of chunks)
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


def _decay(dt_l, A2, out=None):
    """exp(dt_l A) [..., G, Dg, N] as exp2(dt_l A log2 e): exp2 is several times cheaper than
    exp on CPU, and the decay dominates these loops. In ``out`` when given (buffers are
    reused: fresh large tensors cost page faults on CPU)."""
    return torch.mul(dt_l[..., None], A2, out=out).exp2_()


def _advance(h, a, w, Bm):
    """h <- a h + w B, in place. h, a [..., Dg, N]; w [..., Dg]; Bm [..., N]."""
    return h.mul_(a).addcmul_(w[..., None], Bm[..., None, :])


def _carry(tot, ends, h0):
    """States entering each chunk: H_0 = h0, H_{c+1} = tot_c H_c + ends_c."""
    H = torch.empty_like(ends)
    H[0] = h0
    for c in range(tot.shape[0] - 1):
        torch.addcmul(ends[c], tot[c], H[c], out=H[c + 1])
    return H


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, w, A, Bm, Cm, h0):
        T = dt.shape[0]
        L = _chunk_len(T)
        nC = -(-T // L)
        # dt = 0 (decay 1) and w = 0 leave the state unchanged over the padding.
        dtc, wc, Bc, Cc = (_chunked(x, L, nC) for x in (dt, w, Bm, Cm))
        with torch.no_grad():
            A2 = A * LOG2E
            tot = _decay(dtc.sum(1), A2)  # decay over each whole chunk
            # One decay row per in-chunk position, kept for level 3 and the backward (within
            # SAVE_ELEMENTS), one block per row (see GROUP_ELEMENTS).
            save = nC * L * h0.numel() <= SAVE_ELEMENTS
            dec = [] if save else None
            buf = None if save else torch.empty_like(tot)

            def decay(l):
                if not save:
                    return _decay(dtc[:, l], A2, out=buf)
                if len(dec) == l:
                    dec.append(_decay(dtc[:, l], A2))
                return dec[l]

            # Level 1: every chunk from a zero start, all chunks at once.
            h = torch.zeros_like(tot)
            for l in range(L):
                _advance(h, decay(l), wc[:, l], Bc[:, l])
            H = _carry(tot, h, h0)
            hT = torch.addcmul(h[-1], tot[-1], H[-1])
            # Level 3: again from the true entering states, reading y_t = C_t . h_t out.
            h.copy_(H)
            y = dt.new_empty(nC, L, *dt.shape[1:])
            for l in range(L):
                _advance(h, decay(l), wc[:, l], Bc[:, l])
                # [1, N] @ [N, Dg]: this orientation runs several times faster than [Dg, N] @ [N, 1]
                y[:, l] = (Cc[:, l, ..., None, :] @ h.transpose(-1, -2))[..., 0, :]
        ctx.save_for_backward(dtc, wc, A, Bc, Cc, H, tot)
        ctx.decays = dec
        ctx.T = T
        return y.view(nC * L, *dt.shape[1:])[:T], hT

    @staticmethod
    def backward(ctx, gy, ghT):
        dtc, wc, A, Bc, Cc, H, tot = ctx.saved_tensors
        dec, ctx.decays = ctx.decays, None
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
                a = dec[l] if dec is not None else _decay(dtc[:, l], A2, out=buf)
                e.addcmul_(gyc[:, l, ..., None], Cc[:, l, ..., None, :]).mul_(a)
            # Level 2: E_c, the adjoint arriving at the end of chunk c from later chunks.
            E = torch.empty_like(H)
            E[-1] = ghT
            for c in range(nC - 1, 0, -1):
                torch.addcmul(e[c], tot[c], E[c], out=E[c - 1])
            gh0 = torch.addcmul(e[0], tot[0], E[0])
            del e
            grads = _backward_groups(dec, dtc, wc, A, A2, Bc, Cc, H, E, gyc)
        gdt, gw, gA, gB, gC = grads
        return (_unchunk(gdt, T), _unchunk(gw, T), gA, _unchunk(gB, T), _unchunk(gC, T), gh0)


def _unchunk(x, T: int):
    nC, L = x.shape[:2]
    return x.view(nC * L, *x.shape[2:])[:T]


def _backward_groups(dec, dtc, wc, A, A2, Bc, Cc, H, E, gyc):
    """Gradients from the entering states H and arriving adjoints E, per group of chunks:
    states recomputed forward (kept for the group, row by row), then the adjoint run in
    reverse."""
    nC, L = dtc.shape[:2]
    per_chunk = L * H[0].numel()
    step = max(1, min(nC, GROUP_ELEMENTS // max(1, per_chunk)))
    gdt, gw = torch.empty_like(dtc), torch.empty_like(wc)
    gB, gC = torch.empty_like(Bc), torch.empty_like(Cc)
    gA = torch.zeros_like(A)
    for c0 in range(0, nC, step):
        sl = slice(c0, min(nC, c0 + step))
        if dec is not None:
            a_grp = [d[sl] for d in dec]
        else:
            a_grp = [_decay(dtc[sl, l], A2) for l in range(L)]
        hs = [H[sl]]  # hs[l] is the state before position l
        for l in range(L):
            hs.append(torch.mul(hs[l], a_grp[l]).addcmul_(
                wc[sl, l, ..., None], Bc[sl, l, ..., None, :]))
        e = E[sl].clone()
        # sum over positions of d(log a) * dt, per chunk: summed over chunks once at the end
        dlog_dt = torch.zeros_like(e)
        for l in range(L - 1, -1, -1):
            gy_l, w_l = gyc[sl, l], wc[sl, l]
            gC[sl, l] = (gy_l[..., None, :] @ hs[l + 1])[..., 0, :]
            g = e.addcmul_(gy_l[..., None], Cc[sl, l, ..., None, :])  # g_l, in e's memory
            gw[sl, l] = (Bc[sl, l, ..., None, :] @ g.transpose(-1, -2))[..., 0, :]
            gB[sl, l] = (w_l[..., None, :] @ g)[..., 0, :]
            e = g.mul_(a_grp[l])  # a_l g_l
            # d/d(log a_l) = g_l a_l h_{l-1}, into h_l's memory (h_l is no longer needed)
            dlog = torch.mul(e, hs[l], out=hs[l + 1])
            dlog_dt.addcmul_(dlog, dtc[sl, l, ..., None])
            gdt[sl, l] = dlog.mul_(A).sum(-1)
        gA += dlog_dt.sum((0, 1))
    return gdt, gw, gA, gB, gC


def selective_scan_core(dt, w, A, Bm, Cm, h0):
    """y [T, Bt, G, Dg] and h_T [Bt, G, Dg, N]; differentiable in every argument."""
    return _SelectiveScan.apply(dt, w, A, Bm, Cm, h0)
