"""The selective scan's backward, per group of chunks (the torch path of DESIGN 2.1; the
forward and the chunk levels are in ``selective_scan``), and the two state operations both
directions share: the decay exp(dt A) and the restart at a packed row's document starts."""

from __future__ import annotations

import torch


def ssm_decay(dt_l, A2, out=None):
    """exp(dt_l A) [..., G, Dg, N] as exp2(dt_l A log2 e): exp2 is several times cheaper than
    exp on CPU, and the decay dominates these loops. In ``out`` when given (buffers are
    reused: fresh large tensors cost page faults on CPU)."""
    return torch.mul(dt_l[..., None], A2, out=out).exp2_()


def restart(h, rc, l: int):
    """Zero, in place, the states h [nC, ...] of the chunks whose position l starts a
    document (``rc`` [nC, L] bool; None: no restarts). A fill, not a zero decay: a zero times
    another document's NaN would be NaN."""
    if rc is not None:
        h.masked_fill_(rc[:, l].view(-1, *([1] * (h.ndim - 1))), 0.0)
    return h


def backward_groups(dec, dtc, wc, A, A2, Bc, Cc, H, E, gyc, group_elements: int, rc=None):
    """Gradients from the entering states H and arriving adjoints E, per group of chunks:
    states recomputed forward (kept for the group, row by row), then the adjoint run in
    reverse, ``group_elements`` states at a time. ``rc`` [nC, L]: where documents start
    (the state before them is zero, and no adjoint passes back across them)."""
    nC, L = dtc.shape[:2]
    per_chunk = L * H[0].numel()
    step = max(1, min(nC, group_elements // max(1, per_chunk)))
    gdt, gw = torch.empty_like(dtc), torch.empty_like(wc)
    gB, gC = torch.empty_like(Bc), torch.empty_like(Cc)
    gA = torch.zeros_like(A)
    for c0 in range(0, nC, step):
        sl = slice(c0, min(nC, c0 + step))
        if dec is not None:
            a_grp = [d[sl] for d in dec]
        else:
            a_grp = [ssm_decay(dtc[sl, l], A2) for l in range(L)]
        rcg = None if rc is None else rc[sl]
        hs = [H[sl]]  # hs[l] is the state before position l
        prev = []  # the same, zero where position l starts a document
        for l in range(L):
            prev.append(hs[l] if rcg is None else restart(hs[l].clone(), rcg, l))
            hs.append(torch.mul(prev[l], a_grp[l]).addcmul_(
                wc[sl, l, ..., None], Bc[sl, l, ..., None, :]))
            # gC needs h_l and gy only: read it out while h_l is still in cache
            gC[sl, l] = (gyc[sl, l, ..., None, :] @ hs[l + 1])[..., 0, :]
        del hs[L]  # the last state enters no product below
        e = E[sl].clone()
        # sum over positions of d(log a) * dt, per chunk: summed over chunks once at the end
        dlog_dt = torch.zeros_like(e)
        dlog_buf = torch.empty_like(e)  # one buffer for every position: stays in cache
        for l in range(L - 1, -1, -1):
            gy_l, w_l = gyc[sl, l], wc[sl, l]
            g = e.addcmul_(gy_l[..., None], Cc[sl, l, ..., None, :])  # g_l, in e's memory
            gw[sl, l] = (Bc[sl, l, ..., None, :] @ g.transpose(-1, -2))[..., 0, :]
            gB[sl, l] = (w_l[..., None, :] @ g)[..., 0, :]
            e = g.mul_(a_grp[l])  # a_l g_l
            # d/d(log a_l) = g_l a_l h_{l-1}
            dlog = torch.mul(e, prev[l], out=dlog_buf)
            dlog_dt.addcmul_(dlog, dtc[sl, l, ..., None])
            gdt[sl, l] = dlog.mul_(A).sum(-1)
            restart(e, rcg, l)
        gA += dlog_dt.sum((0, 1))
    return gdt, gw, gA, gB, gC
