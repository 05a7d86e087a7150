"""Selective scan ``h_t = exp(dt_t A) h_{t-1} + w_t B_t``, ``y_t = C_t . h_t`` in O(T Dc N).

Two levels over chunks of L steps (L about sqrt(T)):

1. a loop over the L positions of a chunk that advances every chunk at once from a zero start
   (vectorised over the T/L chunks), keeping only each chunk's end state;
2. a loop over the chunks for the carries: the state entering each chunk;
3. the first loop again from the true entering states, contracting each state with C_t as it
   is produced, so the full [T, Dc, N] state is never stored.

The backward is the same recurrence run in reverse (the adjoint ``g_t = C_t gy_t +
a_{t+1} g_{t+1}``), with the same two levels; states are recomputed per group of chunks from
the saved entering states, so memory stays O(T (Dc + N) + group) instead of autograd's
O(T Dc N) per intermediate.

Layout (time first, so that one position of every chunk is one contiguous row):
dt, w [T, Bt, G, Dg]; A [G, Dg, N]; Bm, Cm [T, Bt, G, N]; h0 [Bt, G, Dg, N].
"""

from __future__ import annotations

import math

import torch

GROUP_ELEMENTS = 1 << 23  # states kept at once by the backward (per group of chunks)


def _chunk_len(T: int) -> int:
    return math.isqrt(T - 1) + 1 if T > 1 else 1


def _by_position(x, L: int, nC: int):
    """[T, ...] -> [L, nC, ...] (zero padded): row l holds position l of every chunk, one
    contiguous block, so the loops below touch contiguous memory."""
    pad = nC * L - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])], dim=0)
    return x.reshape(nC, L, *x.shape[1:]).transpose(0, 1).contiguous()


def _from_position(x, T: int):
    L, nC = x.shape[:2]
    return x.transpose(0, 1).reshape(nC * L, *x.shape[2:])[:T]


LOG2E = 1.0 / math.log(2.0)
SAVE_ELEMENTS = 1 << 27  # decays kept from the forward for the backward, at most


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
        dtc, wc, Bc, Cc = (_by_position(x, L, nC) for x in (dt, w, Bm, Cm))
        with torch.no_grad():
            A2 = A * LOG2E
            tot = _decay(dtc.sum(0), A2)  # decay over each whole chunk
            # Level 1: every chunk from a zero start, all chunks at once. One decay row per
            # in-chunk position, kept for level 3 (and the backward, within SAVE_ELEMENTS).
            h = torch.zeros(nC, *h0.shape, dtype=h0.dtype, device=h0.device)
            decays = []
            for l in range(L):
                decays.append(_decay(dtc[l], A2))
                _advance(h, decays[l], wc[l], Bc[l])
            H = _carry(tot, h, h0)
            hT = torch.addcmul(h[-1], tot[-1], H[-1])
            # Level 3: again from the true entering states, reading y_t = C_t . h_t out.
            h.copy_(H)
            y = dt.new_empty(L, nC, *dt.shape[1:])
            for l in range(L):
                _advance(h, decays[l], wc[l], Bc[l])
                y[l] = (Cc[l][..., None, :] @ h.transpose(-1, -2))[..., 0, :]
        ctx.save_for_backward(dtc, wc, A, Bc, Cc, H, tot)
        ctx.decays = decays if L * h.numel() <= SAVE_ELEMENTS else None
        ctx.T = T
        return _from_position(y, T), hT

    @staticmethod
    def backward(ctx, gy, ghT):
        dtc, wc, A, Bc, Cc, H, tot = ctx.saved_tensors
        decays, ctx.decays = ctx.decays, None
        L, nC = dtc.shape[:2]
        if gy is None:
            gy = dtc.new_zeros(ctx.T, *dtc.shape[2:])
        if ghT is None:
            ghT = torch.zeros_like(H[0])
        gyc = _by_position(gy, L, nC)
        with torch.no_grad():
            if decays is None:
                A2 = A * LOG2E
                decays = [_decay(dtc[l], A2) for l in range(L)]
            # Level 1, reversed: e after position 0 of a chunk is a_0 g_0 from a zero end.
            e = torch.zeros_like(H)
            for l in range(L - 1, -1, -1):
                e.addcmul_(gyc[l][..., None], Cc[l][..., None, :]).mul_(decays[l])
            # Level 2: E_c, the adjoint arriving at the end of chunk c from later chunks.
            E = torch.empty_like(H)
            E[-1] = ghT
            for c in range(nC - 1, 0, -1):
                torch.addcmul(e[c], tot[c], E[c], out=E[c - 1])
            gh0 = torch.addcmul(e[0], tot[0], E[0])
            grads = _backward_groups(decays, dtc, wc, A, Bc, Cc, H, E, gyc)
        T = ctx.T
        return (*(_from_position(g, T) for g in grads[:2]), grads[2],
                *(_from_position(g, T) for g in grads[3:]), gh0)


def _backward_groups(decays, dtc, wc, A, Bc, Cc, H, E, gyc):
    """Gradients from the entering states H and arriving adjoints E, per group of chunks:
    states recomputed forward (kept for the group, row by row), then the adjoint run in
    reverse."""
    L, nC = dtc.shape[:2]
    per_chunk = L * H[0].numel()
    step = max(1, min(nC, GROUP_ELEMENTS // max(1, per_chunk)))
    gdt, gw = torch.empty_like(dtc), torch.empty_like(wc)
    gB, gC = torch.empty_like(Bc), torch.empty_like(Cc)
    gA = torch.zeros_like(A)
    for c0 in range(0, nC, step):
        sl = slice(c0, min(nC, c0 + step))
        hs = [H[sl]]  # hs[l] is the state before position l
        for l in range(L):
            h = torch.mul(hs[-1], decays[l][sl])
            hs.append(h.addcmul_(wc[l, sl][..., None], Bc[l, sl][..., None, :]))
        e = E[sl].clone()
        dlog = torch.empty_like(e)
        # sum over positions of d(log a) * dt, per chunk: summed over chunks once at the end
        dlog_dt = torch.zeros_like(e)
        for l in range(L - 1, -1, -1):
            gy_l = gyc[l, sl]
            gC[l, sl] = (gy_l[..., None, :] @ hs[l + 1])[..., 0, :]
            g = e.addcmul_(gy_l[..., None], Cc[l, sl][..., None, :])  # g_l, in e's memory
            gw[l, sl] = torch.einsum("cbgdn,cbgn->cbgd", g, Bc[l, sl])
            gB[l, sl] = (wc[l, sl][..., None, :] @ g)[..., 0, :]
            e = g.mul_(decays[l][sl])  # a_l g_l
            torch.mul(e, hs[l], out=dlog)  # d/d(log a_l) = g_l a_l h_{l-1}
            dlog_dt.addcmul_(dlog, dtc[l, sl][..., None])
            gdt[l, sl] = torch.einsum("cbgdn,gdn->cbgd", dlog, A)
        gA += dlog_dt.sum((0, 1))
    return gdt, gw, gA, gB, gC


def selective_scan_core(dt, w, A, Bm, Cm, h0):
    """y [T, Bt, G, Dg] and h_T [Bt, G, Dg, N]; differentiable in every argument."""
    return _SelectiveScan.apply(dt, w, A, Bm, Cm, h0)
