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
    return max(1, math.isqrt(T - 1) + 1) if T > 1 else 1


def _pad(x, n: int):
    if n == 0:
        return x
    return torch.cat([x, x.new_zeros(n, *x.shape[1:])], dim=0)


def _decay(dt_l, A):
    return torch.exp(dt_l[..., None] * A)  # [..., G, Dg, N]


def _run(dt, w, A, Bm, Cm, h, y=None):
    """Advance states h [nC, Bt, G, Dg, N] over the L positions of each chunk.
    dt, w [nC, L, Bt, G, Dg]; Bm, Cm [nC, L, Bt, G, N]. Writes y [nC, L, Bt, G, Dg] when
    given. Returns the end states."""
    for l in range(dt.shape[1]):
        h = torch.addcmul(w[:, l, ..., None] * Bm[:, l, :, :, None, :], _decay(dt[:, l], A), h)
        if y is not None:
            y[:, l] = (h @ Cm[:, l, :, :, :, None])[..., 0]
    return h


def _carry(tot, ends, h0):
    """States entering each chunk: H_0 = h0, H_{c+1} = tot_c H_c + ends_c."""
    H = [h0]
    for c in range(tot.shape[0] - 1):
        H.append(torch.addcmul(ends[c], tot[c], H[-1]))
    return torch.stack(H)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, w, A, Bm, Cm, h0):
        T = dt.shape[0]
        L = _chunk_len(T)
        nC = -(-T // L)
        pad = nC * L - T
        # dt = 0 (decay 1) and w = 0 leave the state unchanged over the padding.
        dtc, wc, Bc, Cc = (_pad(a, pad).reshape(nC, L, *a.shape[1:]) for a in (dt, w, Bm, Cm))
        tot = _decay(dtc.sum(1), A)  # decay over each whole chunk
        with torch.no_grad():
            ends = _run(dtc, wc, A, Bc, Cc, torch.zeros_like(h0).expand(nC, *h0.shape))
            H = _carry(tot, ends, h0)
            y = dt.new_empty(nC, L, *dt.shape[1:])
            _run(dtc, wc, A, Bc, Cc, H, y)
            hT = torch.addcmul(ends[-1], tot[-1], H[-1])
        ctx.save_for_backward(dtc, wc, A, Bc, Cc, H, tot)
        ctx.T = T
        return y.reshape(nC * L, *dt.shape[1:])[:T], hT

    @staticmethod
    def backward(ctx, gy, ghT):
        dtc, wc, A, Bc, Cc, H, tot = ctx.saved_tensors
        nC, L = dtc.shape[:2]
        T = ctx.T
        if gy is None:
            gy = dtc.new_zeros(T, *dtc.shape[2:])
        if ghT is None:
            ghT = torch.zeros_like(H[0])
        gyc = _pad(gy, nC * L - T).reshape(nC, L, *gy.shape[1:])
        # Level 1, reversed: e after position 0 of a chunk is a_0 g_0 from a zero end.
        with torch.no_grad():
            e = torch.zeros_like(H)
            for l in range(L - 1, -1, -1):
                g = torch.addcmul(e, gyc[:, l, ..., None], Cc[:, l, :, :, None, :])
                e = _decay(dtc[:, l], A) * g
            # Level 2: E_c, the adjoint arriving at the end of chunk c from later chunks.
            E = [ghT]
            for c in range(nC - 1, 0, -1):
                E.append(torch.addcmul(e[c], tot[c], E[-1]))
            E = torch.stack(E[::-1])
            gh0 = torch.addcmul(e[0], tot[0], E[0])
            grads = _backward_groups(dtc, wc, A, Bc, Cc, H, E, gyc)
        gdt, gw, gA, gB, gC = grads
        flat = (nC * L, *dtc.shape[2:])
        flatn = (nC * L, *Bc.shape[2:])
        return (gdt.reshape(flat)[:T], gw.reshape(flat)[:T], gA, gB.reshape(flatn)[:T],
                gC.reshape(flatn)[:T], gh0)


def _backward_groups(dtc, wc, A, Bc, Cc, H, E, gyc):
    """Gradients from the entering states H and arriving adjoints E, per group of chunks:
    states recomputed forward (kept for the group), then the adjoint run in reverse."""
    nC, L = dtc.shape[:2]
    per_chunk = L * H[0].numel()
    step = max(1, min(nC, GROUP_ELEMENTS // max(1, per_chunk)))
    gdt, gw = torch.empty_like(dtc), torch.empty_like(wc)
    gB, gC = torch.empty_like(Bc), torch.empty_like(Cc)
    gA = torch.zeros_like(A)
    for c0 in range(0, nC, step):
        sl = slice(c0, min(nC, c0 + step))
        dt, w, Bm, Cm, gy = dtc[sl], wc[sl], Bc[sl], Cc[sl], gyc[sl]
        hs = [H[sl]]  # hs[l] is the state before position l
        for l in range(L):
            hs.append(torch.addcmul(w[:, l, ..., None] * Bm[:, l, :, :, None, :],
                                    _decay(dt[:, l], A), hs[-1]))
        e = E[sl]
        dlog_dt = torch.zeros_like(hs[0])  # sum over positions of d(log a) * dt
        for l in range(L - 1, -1, -1):
            h = hs[l + 1]
            gy_l = gy[:, l]
            gC[sl, l] = torch.einsum("cbgd,cbgdn->cbgn", gy_l, h)
            g = torch.addcmul(e, gy_l[..., None], Cm[:, l, :, :, None, :])
            gw[sl, l] = (g @ Bm[:, l, :, :, :, None])[..., 0]
            gB[sl, l] = torch.einsum("cbgdn,cbgd->cbgn", g, w[:, l])
            a = _decay(dt[:, l], A)
            e = a * g
            dlog = e * hs[l]  # d/d(log a_l) = g_l a_l h_{l-1}
            gdt[sl, l] = (dlog * A).sum(-1)
            dlog_dt.addcmul_(dlog, dt[:, l, ..., None])
        gA += dlog_dt.sum((0, 1))
    return gdt, gw, gA, gB, gC


def selective_scan_core(dt, w, A, Bm, Cm, h0):
    """y [T, Bt, G, Dg] and h_T [Bt, G, Dg, N]; differentiable in every argument."""
    return _SelectiveScan.apply(dt, w, A, Bm, Cm, h0)
