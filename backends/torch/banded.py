"""Banded softmax attention over position windows (the torch path of DESIGN 2.3 and 2.5).

A *source* is a run of keys/values at consecutive absolute positions ``base, base+1, ...`` and
a band ``lo <= t - p < hi``: a query at t sees the keys whose position p lies in it (and
p >= 0). Queries go in blocks of Q; block j reads one window of Q + hi - lo - 1 keys
(``Tensor.unfold``, a view), so memory is O(T (Q + W)), never T x T.

Each source gives a partial softmax (row max, sum of weights, weighted values); partials merge
by log-sum-exp, which equals one softmax over the union of the sources.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .numerics import NEG_INF, all_finite, finite_values, mark_seen, sdpa

MIN_BLOCK = 16
# Scores per group of query blocks: each group's temporaries (scores, weights and their
# gradients) stay under glibc's largest mmap threshold (32 MiB), so they are reused from the
# heap instead of being mapped, and page-faulted, afresh; measured 1.5-2x faster at T = 8192.
SCORE_ELEMENTS = 1 << 22


def block_len(T: int, sources) -> int:
    """Queries per block: half the widest band (a block of Q reads Q + band - 1 keys, so the
    share of masked scores falls as Q shrinks, until the matrix products get too small)."""
    widest = max(s[4] - s[3] for s in sources)
    return min(T, max(MIN_BLOCK, -(-widest // 2)))


def _band_slices(q, pos: int, sources, Q: int, seg=None):
    """Blocked queries [B, H, nB, Q, E]; per source the run of keys/values that its blocks'
    windows cover (block j reads Lw = Q + hi - lo - 1 of them from offset j Q) and Lw; and
    the mask of every block's window [nB, Q, sum Lw]. ``seg`` [n] (a packed row's document
    of each position 0 .. n-1): a query sees keys of its own document only."""
    B, H, T, E = q.shape
    nB = -(-T // Q)
    qb = F.pad(q, (0, 0, 0, nB * Q - T)).reshape(B, H, nB, Q, E)
    dev = q.device
    a = torch.arange(Q, device=dev)
    jstart = torch.arange(nB, device=dev) * Q
    runs, masks = [], []
    for k, v, base, lo, hi in sources:
        Lw = Q + hi - lo - 1
        s0 = pos - hi + 1 - base
        need = (nB - 1) * Q + Lw
        kk, vv = k[:, :, s0:s0 + need], v[:, :, s0:s0 + need]
        if kk.shape[2] < need:
            kk = F.pad(kk, (0, 0, 0, need - kk.shape[2]))
            vv = F.pad(vv, (0, 0, 0, need - vv.shape[2]))
        runs.append((kk, vv, Lw))
        b = torch.arange(Lw, device=dev)
        d = a[:, None] - b[None, :] + (hi - 1)  # t - p within a block
        rel = (d >= lo) & (d < hi)  # [Q, Lw]
        kpos = (pos - hi + 1) + jstart[:, None] + b[None, :]  # [nB, Lw]
        mask = rel[None] & (kpos >= 0)[:, None, :]
        if seg is not None:
            last = seg.shape[0] - 1
            qseg = seg[(pos + jstart[:, None] + a[None, :]).clamp(0, last)]  # [nB, Q]
            mask = mask & (qseg[:, :, None] == seg[kpos.clamp(0, last)][:, None, :])
        masks.append(mask)
    return qb, runs, _cat(masks, -1)


def _windows(run, Q: int):
    """[B, H, need, E] -> the overlapping windows [B, H, nB, Lw, E] (a view)."""
    x, Lw = run
    return x.unfold(2, Lw, Q).transpose(-1, -2)


def _band_windows(q, pos: int, sources, block: int | None):
    """Blocked queries and, per source, the key/value window of each block and its mask."""
    Q = block or block_len(q.shape[2], sources)
    qb, runs, mask = _band_slices(q, pos, sources, Q)
    keys = [_windows((kk, Lw), Q) for kk, _, Lw in runs]
    values = [_windows((vv, Lw), Q) for _, vv, Lw in runs]
    return qb, _cat(keys, -2), _cat(values, -2), mask


def _cat(xs, dim):
    return torch.cat(xs, dim) if len(xs) > 1 else xs[0]


def _fold(gw, Q: int):
    """Adjoint of ``_windows``: window gradients [B, H, nB, Lw, E] summed back onto the run
    [B, H, (nB - 1) Q + Lw, E], one strided add per block-sized slice of the window."""
    B, H, nB, Lw, E = gw.shape
    R = -(-Lw // Q)
    out = gw.new_zeros(B, H, (nB + R - 1) * Q, E)
    ov = out.view(B, H, nB + R - 1, Q, E)
    for r in range(R):
        w = min(Q, Lw - r * Q)
        ov[:, :, r:r + nB, :w] += gw[:, :, :, r * Q:r * Q + w]
    return out[:, :, :(nB - 1) * Q + Lw]


class _BandSoftmax(torch.autograd.Function):
    """(m, l, acc) of ``partial`` over every block's windows, with a hand-written backward:
    the weights are made in place in the score buffer and kept, and the window gradients are
    folded back onto the key/value runs directly. About half the memory passes of autograd
    over the same operations. m carries no gradient (a stabiliser, as in ``partial``)."""

    @staticmethod
    def forward(ctx, Q, Lws, finite, by_mask, mask, qs, *runs):
        with torch.no_grad():
            K = _cat([_windows((r, Lw), Q) for r, Lw in zip(runs[0::2], Lws, strict=True)], -2)
            values, seen = runs[1::2], None
            if not finite and by_mask:  # the band is not the mask (a packed row): read it
                values, seen = _finite_runs_masked(values, Lws, Q, mask)
            elif not finite:  # DESIGN 6: no masked non-finite value reaches a row
                values, seen = _finite_runs(values, Lws, Q)
            V = _cat([_windows((r, Lw), Q) for r, Lw in zip(values, Lws, strict=True)], -2)
            K, V = K.contiguous(), V.contiguous()
            s = qs @ K.transpose(-1, -2)
            s.masked_fill_(~mask, NEG_INF)
            m = s.amax(-1, keepdim=True) if s.shape[-1] else torch.full_like(s[..., :1],
                                                                              NEG_INF)
            p = s.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m))).exp_()
            l = p.sum(-1, keepdim=True)
            acc = p @ V
            if seen is not None:
                acc = mark_seen(acc, seen.reshape(acc.shape[:-1]))
        ctx.save_for_backward(qs, K, V, p)
        ctx.Q, ctx.Lws = Q, Lws
        ctx.mark_non_differentiable(m)
        return m, l, acc

    @staticmethod
    def backward(ctx, gm, gl, gacc):
        qs, K, V, p = ctx.saved_tensors
        Q, Lws = ctx.Q, ctx.Lws
        with torch.no_grad():
            if gacc is None:
                gacc = torch.zeros(*p.shape[:-1], V.shape[-1], dtype=p.dtype, device=p.device)
            gs = gacc @ V.transpose(-1, -2)
            if gl is not None:
                gs.add_(gl)
            gs.mul_(p)  # d/ds = p (gl + gacc . v); masked scores have p = 0
            gq = gs @ K
            gK = gs.transpose(-1, -2) @ qs
            gV = p.transpose(-1, -2) @ gacc
            grads = []
            for gk, gv in zip(gK.split(list(Lws), -2), gV.split(list(Lws), -2), strict=True):
                grads += [_fold(gk, Q), _fold(gv, Q)]
        return (None, None, None, None, None, gq, *grads)


def _finite_runs(values, Lws, Q: int):
    """The value runs with non-finite entries zeroed, and which queries [B, H, nB * Q] have
    one in their band: block j's query a sees run rows j Q + a .. j Q + a + Lw - Q (the
    window's band), so a running count of the runs' non-finite rows gives each query's."""
    clean, seen = [], None
    for r, Lw in zip(values, Lws, strict=True):
        r0, bad = finite_values(r)
        clean.append(r0)
        count = F.pad(bad.cumsum(-1), (1, 0))  # non-finite rows before each run row
        n = r.shape[2] - (Lw - Q)  # nB * Q queries
        hit = count[..., Lw - Q + 1:Lw - Q + 1 + n] > count[..., :n]
        seen = hit if seen is None else seen | hit
    return clean, seen


def _finite_runs_masked(values, Lws, Q: int, mask):
    """``_finite_runs`` where a query's band holds keys it must not see (another document's):
    a query is marked where its mask [nB, Q, sum Lw] admits a non-finite row."""
    clean, bad = [], []
    for r, Lw in zip(values, Lws, strict=True):
        r0, b = finite_values(r)
        clean.append(r0)
        bad.append(b.unfold(2, Lw, Q))  # [B, H, nB, Lw]
    seen = (mask & _cat(bad, -1)[:, :, :, None, :]).any(-1)  # [B, H, nB, Q]
    return clean, seen.flatten(2)


def band_partial(q, pos: int, sources, scale: float, block: int | None = None, seg=None):
    """Partial softmax of queries q [B, H, T, E] at positions pos .. pos+T-1 over banded
    sources, each ``(k, v, base, lo, hi)``: k, v [B, H, S, E] at positions base .. base+S-1,
    with ``base <= pos - hi + 1``. Sources in one call share one softmax. ``seg``: a packed
    row's document of each position (see ``_band_slices``).
    Returns (m, l, acc) over [B, H, T]. Queries go in groups of blocks (SCORE_ELEMENTS)."""
    B, H, T, E = q.shape
    Q = block or block_len(T, sources)
    keys = sum(Q + hi - lo - 1 for _, _, _, lo, hi in sources)
    span = Q * max(1, SCORE_ELEMENTS // max(1, B * H * Q * keys))  # queries per group
    def part(qq, p0):
        extra = () if seg is None else (seg,)
        return _band_partial(qq, p0, sources, scale, Q, *extra)

    if span >= T:
        return part(q, pos)
    parts = [part(q[:, :, t0:t0 + span], pos + t0) for t0 in range(0, T, span)]
    return tuple(torch.cat(x, dim=2) for x in zip(*parts, strict=True))


def _band_partial(q, pos: int, sources, scale: float, block: int, seg=None):
    B, H, T, E = q.shape
    qb, runs, mask = _band_slices(q, pos, sources, block, seg)
    flat = [x for kk, vv, _ in runs for x in (kk, vv)]
    finite = all_finite(*(vv for _, vv, _ in runs))
    m, l, acc = _BandSoftmax.apply(block, tuple(Lw for *_, Lw in runs), finite,
                                   seg is not None, mask, qb * scale, *flat)
    n = qb.shape[2] * qb.shape[3]
    return (m.reshape(B, H, n, 1)[:, :, :T], l.reshape(B, H, n, 1)[:, :, :T],
            acc.reshape(B, H, n, E)[:, :, :T])


def band_sdpa(q, pos: int, source, scale: float, block: int | None = None):
    """Normalised banded attention of one source through scaled_dot_product_attention; a
    row with no key in its band reads 0."""
    B, H, T, E = q.shape
    qb, kw, vw, mask = _band_windows(q, pos, [source], block)
    empty = ~mask.any(-1, keepdim=True)  # [nB, Q, 1]
    # An empty row would give NaN; let it see every key, then zero it (no gradient leaks).
    o = sdpa(qb, kw, vw, mask | empty, scale=scale)
    o = o.masked_fill(empty, 0.0)
    return o.reshape(B, H, qb.shape[2] * qb.shape[3], E)[:, :, :T]
