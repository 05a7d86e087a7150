"""The windowed readout (DESIGN 2.3, with the store of 2.4 as a source), forward and backward,
in Triton.

One online softmax (scale 1/sqrt(E)) per query at absolute position t over three sources:

    raw     keys at positions (t - W, t]          (k, v)
    fading  keys at positions (t - 2W, t - W]     (fading_k, fading_v)
    store   entries of the snapshot of t's chunk with position p <= t - W  (store_k, store_v)

Tiles of queries meet tiles of keys only where the masks can be true, so the work is
O(T (2W + S M)) and no T x T matrix is ever formed. The forward keeps the row's log-sum-exp;
the backward recomputes probabilities from it (FlashAttention-2): one kernel for dq that walks
the same tiles, and one for the keys and values of each source that walks the query tiles
which can see them. The backward kernels are in ``windowed_readout_bwd``.

Layouts: q [B, Tq, H, E]; k, v, fading_k, fading_v [B, Tk, H, E] with Tk >= Tq, key j sitting
at position pos - (Tk - Tq) + j (so a cache of earlier keys can precede the queries' own);
store_k, store_v [B, H, S, M, E] with store_pos [B, S, M] (negative: empty slot), snapshot s
serving the queries of chunk pos // chunk + s.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .buffers import TileConfig, acc_dtype, check_device, check_float, check_same_shape, empty
from .softmax_tiles import dot as _dot
from .softmax_tiles import dq_part as _dq_part
from .softmax_tiles import finite_values as _finite_values
from .softmax_tiles import program_rows as _program_rows
from .softmax_tiles import rows as _rows
from .softmax_tiles import softmax_start as _softmax_start
from .softmax_tiles import softmax_step as _softmax_step
from .softmax_tiles import store_rows as _store_rows
from .softmax_tiles import visible_scores as _visible_scores

RAW, FADING, STORE = 0, 1, 2


@triton.jit
def _visible(MODE: tl.constexpr, i, j, spos, s_q, s, off, W, pos, Tq, Tk, M, kst):
    """Mask of query index i against key index j (or store slot j), broadcast together; kst:
    the query's first key index (its document's first token in a packed row, else 0)."""
    if MODE == 0:
        m = (j <= i + off) & (j > i + off - W) & (j >= kst) & (j < Tk)
    elif MODE == 1:
        m = (j <= i + off - W) & (j > i + off - 2 * W) & (j >= kst) & (j < Tk)
    else:
        m = (j < M) & (spos >= 0) & (spos <= pos + i - W) & (s_q == s)
    return m & (i < Tq)


@triton.jit
def _kv_ptrs(MODE: tl.constexpr, kb, vb, j, e, b, h, s, H, E, Tk, S, M):
    """Pointers to the key and value rows j (store: slots j of snapshot s). [BN, BE]."""
    if MODE == 2:
        row = (((b * H + h) * S + s) * M + j) * E
    else:
        row = ((b * Tk + j) * H + h) * E
    return kb + row[:, None] + e[None, :], vb + row[:, None] + e[None, :]


@triton.jit
def _load_kv(MODE: tl.constexpr, kb, vb, spb, j, e, b, h, s, H, E, Tk, S, M):
    """Key and value tiles [BN, BE] and the rows' positions (store) or indices."""
    kp, vp = _kv_ptrs(MODE, kb, vb, j, e, b, h, s, H, E, Tk, S, M)
    if MODE == 2:
        row_ok = j < M
        spos = tl.load(spb + (b * S + s) * M + j, mask=row_ok, other=-1)
    else:
        row_ok = (j >= 0) & (j < Tk)
        spos = j
    kv_ok = row_ok[:, None] & (e[None, :] < E)
    kt = tl.load(kp, mask=kv_ok, other=0.0)
    vt = tl.load(vp, mask=kv_ok, other=0.0)
    return kt, vt, spos


@triton.jit
def _tile(acc, m_i, l_i, q, do, lse, dlt, i, s_q, kst, kb, vb, spb, b, h, s, j0, off, W, pos, Tq,
          Tk, S, M, E, H, scale, MODE: tl.constexpr, GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_E: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """Key tile j0 of one source (the store: of snapshot s) against the query tile, folded into
    the online softmax (acc, m_i, l_i), or with GRAD into dq (acc; m_i and l_i pass through)."""
    j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    kt, vt, spos = _load_kv(MODE, kb, vb, spb, j, e, b, h, s, H, E, Tk, S, M)
    sc = _dot(q, tl.trans(kt), IEEE).to(ACC) * scale  # [BM, BN]
    vis = _visible(MODE, i[:, None], j[None, :], spos[None, :], s_q[:, None], s, off, W, pos,
                   Tq, Tk, M, kst[:, None])
    if GRAD:
        acc = acc + _dq_part(sc, vis, lse, dlt, do, kt, vt, IEEE, ACC) * scale
    else:  # the gradient may be NaN where a value is; the forward is causal for it
        vt, bad = _finite_values(vt)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, _visible_scores(sc, vis, bad), vt, IEEE,
                                      ACC)
    return acc, m_i, l_i


@triton.jit
def _doc_starts(docs, i, Tq, HAS_DOCS: tl.constexpr):
    """Each query's first key index [BM]: its document's first token (``docs`` row 0) in a
    packed row, else 0."""
    if HAS_DOCS:
        return tl.load(docs + i, mask=i < Tq, other=0)
    return i * 0


@triton.jit
def _sweep(acc, m_i, l_i, qt, dot_, lse_i, dlt_i, i0, i, k, v, fk, fv, sk, sv, spos, docs, b, h,
           Tq, Tk, H, E, S, M, W, pos, C, scale, HAS_FADING: tl.constexpr,
           HAS_STORE: tl.constexpr, HAS_DOCS: tl.constexpr, GRAD: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
           IEEE: tl.constexpr, ACC: tl.constexpr):
    """Every key tile of the three sources that some row of the query tile can see, through
    ``_tile``: the gradient walks the forward's tiles. In a packed row (``HAS_DOCS``) the
    tiles before the first row's document are skipped."""
    off = Tk - Tq
    s_q = (pos + i) // C - pos // C
    kst = _doc_starts(docs, i, Tq, HAS_DOCS)
    first = tl.min(tl.where(i < Tq, kst, Tk), axis=0)
    i_last = tl.minimum(i0 + BLOCK_M, Tq) - 1
    lo = tl.maximum(tl.maximum(i0 + off - W + 1, 0), first)
    hi = tl.minimum(i_last + off + 1, Tk)
    for j0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, qt, dot_, lse_i, dlt_i, i, s_q, kst, k, v, spos, b,
                              h, 0, j0, off, W, pos, Tq, Tk, S, M, E, H, scale, 0, GRAD, BLOCK_N,
                              BLOCK_E, IEEE, ACC)
    if HAS_FADING:
        lo = tl.maximum(tl.maximum(i0 + off - 2 * W + 1, 0), first)
        hi = tl.minimum(i_last + off - W + 1, Tk)
        for j0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, qt, dot_, lse_i, dlt_i, i, s_q, kst, fk, fv,
                                  spos, b, h, 0, j0, off, W, pos, Tq, Tk, S, M, E, H, scale, 1,
                                  GRAD, BLOCK_N, BLOCK_E, IEEE, ACC)
    if HAS_STORE:
        s_lo = (pos + i0) // C - pos // C
        s_hi = (pos + i_last) // C - pos // C
        for s in range(s_lo, s_hi + 1):
            # js, not j0: a name the loops above left int64 would change type in this loop
            for js in range(0, M, BLOCK_N):
                acc, m_i, l_i = _tile(acc, m_i, l_i, qt, dot_, lse_i, dlt_i, i, s_q, kst, sk, sv,
                                      spos, b, h, s, js, off, W, pos, Tq, Tk, S, M, E, H, scale,
                                      2, GRAD, BLOCK_N, BLOCK_E, IEEE, ACC)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(q, k, v, fk, fv, sk, sv, spos, docs, o, lse,
                     Tq, Tk, H, E, S, M, W, pos, C, scale,
                     HAS_FADING: tl.constexpr, HAS_STORE: tl.constexpr, HAS_DOCS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                     IEEE: tl.constexpr, ACC: tl.constexpr):
    i0, bh, b, h, i, e = _program_rows(H, BLOCK_M, BLOCK_E)
    rows, q_ok = _rows(b, h, i, e, Tq, H, E)
    qt = tl.load(q + rows, mask=q_ok, other=0.0)
    acc, m_i, l_i = _softmax_start(BLOCK_M, BLOCK_E, ACC)
    # the gradient's do, lse and D are not read here: qt and m_i stand in
    acc, m_i, l_i = _sweep(acc, m_i, l_i, qt, qt, m_i, m_i, i0, i, k, v, fk, fv, sk, sv, spos,
                           docs, b, h, Tq, Tk, H, E, S, M, W, pos, C, scale, HAS_FADING,
                           HAS_STORE, HAS_DOCS, False, BLOCK_M, BLOCK_N, BLOCK_E, IEEE, ACC)
    _store_rows(o, lse, rows, q_ok, i, bh, Tq, acc, m_i, l_i)


class _Cfg(TileConfig):
    """Sizes and flags of one call's kernels."""

    def __init__(self, q, k, store_k, window, pos, chunk):
        super().__init__(q.dtype, q.shape[3], _attn_fwd_kernel, q.device)
        self.B, self.Tq, self.H, self.E = q.shape
        self.Tk = k.shape[1]
        self.S, self.M = (store_k.shape[2], store_k.shape[3]) if store_k is not None else (1, 0)
        # an unbounded window is a window longer than anything it could reach
        self.W = window if window is not None else self.Tk + self.Tq + 1
        self.pos = pos
        self.C = chunk if chunk is not None else 1
        self.scale = 1.0 / math.sqrt(self.E)

    def args(self):
        return (self.Tq, self.Tk, self.H, self.E, self.S, self.M, self.W, self.pos, self.C,
                self.scale)

    def blocks(self):
        return dict(BLOCK_M=self.BM, BLOCK_N=self.BN, BLOCK_E=self.BE, IEEE=self.ieee,
                    ACC=self.acc)


class _WindowedReadout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fk, fv, sk, sv, spos, window, pos, chunk, docs):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        fk, fv, sk, sv = (None if t is None else t.contiguous() for t in (fk, fv, sk, sv))
        cfg = _Cfg(q, k, sk, window, pos, chunk)
        o = empty(q.shape, q.dtype, q.device)
        lse = empty((cfg.B, cfg.H, cfg.Tq), acc_dtype(q.dtype), q.device)
        sp = spos.contiguous() if spos is not None else lse  # never read without a store
        _attn_fwd_kernel[(triton.cdiv(cfg.Tq, cfg.BM), cfg.B * cfg.H)](
            q, k, v, fk if fk is not None else k, fv if fv is not None else v,
            sk if sk is not None else k, sv if sv is not None else v, sp,
            docs if docs is not None else sp, o, lse, *cfg.args(),
            HAS_FADING=fk is not None, HAS_STORE=sk is not None, HAS_DOCS=docs is not None,
            **cfg.blocks())
        ctx.save_for_backward(q, k, v, fk, fv, sk, sv, sp, o, lse)
        ctx.docs = docs
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        # imported here: the backward kernels use this module's tile helpers
        from .windowed_readout_bwd import _attn_dkdv_kernel, _attn_dq_kernel

        q, k, v, fk, fv, sk, sv, sp, o, lse = ctx.saved_tensors
        cfg = ctx.cfg
        docs = ctx.docs if ctx.docs is not None else sp
        acc = acc_dtype(q.dtype)
        do = do.contiguous()
        # D_i = do_i . o_i, the softmax's row correction, as [B, H, Tq]
        dlt = (do.to(acc) * o.to(acc)).sum(-1).permute(0, 2, 1).contiguous()
        dq = empty(q.shape, acc, q.device)
        _attn_dq_kernel[(triton.cdiv(cfg.Tq, cfg.BM), cfg.B * cfg.H)](
            q, k, v, fk if fk is not None else k, fv if fv is not None else v,
            sk if sk is not None else k, sv if sv is not None else v, sp, docs, do, lse, dlt,
            dq, *cfg.args(), HAS_FADING=fk is not None, HAS_STORE=sk is not None,
            HAS_DOCS=ctx.docs is not None, **cfg.blocks())

        def kv_grads(mode, kk, vv, tiles):
            dk = empty(kk.shape, acc, q.device)
            dv = empty(vv.shape, acc, q.device)
            _attn_dkdv_kernel[(tiles, cfg.B * cfg.H)](
                q, kk, vv, sp, docs, do, lse, dlt, dk, dv, *cfg.args(), MODE=mode,
                HAS_DOCS=ctx.docs is not None, **cfg.blocks())
            return dk.to(kk.dtype), dv.to(vv.dtype)

        n_key_tiles = triton.cdiv(cfg.Tk, cfg.BN)
        dk, dv = kv_grads(RAW, k, v, n_key_tiles)
        dfk = dfv = dsk = dsv = None
        if fk is not None:
            dfk, dfv = kv_grads(FADING, fk, fv, n_key_tiles)
        if sk is not None and cfg.M > 0:
            dsk, dsv = kv_grads(STORE, sk, sv, cfg.S * triton.cdiv(cfg.M, cfg.BN))
        elif sk is not None:
            dsk, dsv = torch.zeros_like(sk), torch.zeros_like(sv)
        return (dq.to(q.dtype), dk, dv, dfk, dfv, dsk, dsv, None, None, None, None, None)


def _check(q, k, v, window, fading_k, fading_v, store_k, store_v, store_pos, chunk, pos):
    where = "windowed_readout"
    for name, t in (("q", q), ("k", k), ("v", v), ("fading_k", fading_k),
                    ("fading_v", fading_v), ("store_k", store_k), ("store_v", store_v)):
        if t is not None:
            check_float(where, name, t)
            if t.dtype != q.dtype:
                raise TypeError(f"{where}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    check_device(where, q, k=k, v=v, fading_k=fading_k, fading_v=fading_v, store_k=store_k,
                 store_v=store_v, store_pos=store_pos)
    if q.ndim != 4:
        raise ValueError(f"{where}: q must be [B, Tq, H, E], got shape {tuple(q.shape)}")
    B, Tq, H, E = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[2:] != q.shape[2:] or k.shape[1] < Tq:
        raise ValueError(f"{where}: k must be [B={B}, Tk >= {Tq}, H={H}, E={E}], got "
                         f"{tuple(k.shape)}")
    for name, t in (("v", v), ("fading_k", fading_k), ("fading_v", fading_v)):
        check_same_shape(where, name, t, "k", k)
    if (fading_k is None) != (fading_v is None):
        raise ValueError(f"{where}: give both fading_k and fading_v, or neither")
    if not isinstance(pos, int) or pos < k.shape[1] - Tq:
        raise ValueError(f"{where}: pos must be an int >= Tk - Tq = {k.shape[1] - Tq} (no key "
                         f"sits before position 0), got {pos!r}")
    if window is None:
        if fading_k is not None or store_k is not None:
            raise ValueError(f"{where}: window must be an int when fading keys or a store are "
                             f"given, got None")
    elif not isinstance(window, int) or window < 1:
        raise ValueError(f"{where}: window must be a positive int or None, got {window!r}")
    given = [t is not None for t in (store_k, store_v, store_pos, chunk)]
    if any(given) and not all(given):
        raise ValueError(f"{where}: give store_k, store_v, store_pos and chunk together, or none")
    if store_k is None:
        return
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{where}: chunk must be a positive int, got {chunk!r}")
    S = (pos + Tq - 1) // chunk - pos // chunk + 1 if Tq > 0 else 0
    if store_k.ndim != 5 or store_k.shape[:3] != (B, H, S) or store_k.shape[4] != E:
        raise ValueError(f"{where}: store_k must be [B={B}, H={H}, snapshots={S}, slots, E={E}] "
                         f"(one snapshot per chunk the queries touch), got "
                         f"{tuple(store_k.shape)}")
    check_same_shape(where, "store_v", store_v, "store_k", store_k)
    want = (B, S, store_k.shape[3])
    if tuple(store_pos.shape) != want or store_pos.dtype.is_floating_point:
        raise ValueError(f"{where}: store_pos must be an integer tensor of shape {want}, got "
                         f"{tuple(store_pos.shape)} {store_pos.dtype}")


def _docs(cu_seqlens, q, k, store_k, pos):
    """[2, T] int64: each position's document start and end (exclusive), from ``cu_seqlens``
    (int32 [N + 1], checked by the caller: 0, strictly increasing, T)."""
    where = "windowed_readout"
    if store_k is not None or pos != 0 or k.shape[1] != q.shape[1] or q.shape[0] != 1:
        raise ValueError(f"{where}: cu_seqlens takes one packed row (batch 1) of its own keys "
                         f"from position 0, without a store")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    if cu.ndim != 1 or cu.shape[0] < 2 or int(cu[-1]) != q.shape[1]:
        raise ValueError(f"{where}: cu_seqlens must be [N + 1] ending at T={q.shape[1]}, got "
                         f"{tuple(cu.shape)}")
    lengths = cu[1:] - cu[:-1]
    return torch.stack([cu[:-1].repeat_interleave(lengths),
                        cu[1:].repeat_interleave(lengths)]).contiguous()


def windowed_readout(q, k, v, window, fading_k=None, fading_v=None, store_k=None, store_v=None,
                    store_pos=None, chunk=None, pos=0, cu_seqlens=None):
    """One softmax over the raw window, the fading window and the visible store entries.

    q: [B, Tq, H, E] at positions pos .. pos + Tq - 1; k, v (and fading_k, fading_v):
    [B, Tk, H, E], Tk >= Tq, the last Tq rows at the queries' positions (earlier rows are a cache
    of the positions before). window: W, or None for full causal attention over the raw keys.
    store_k, store_v: [B, H, S, M, E] and store_pos [B, S, M] (int, negative for an empty slot):
    snapshot s is the store after chunk pos // chunk + s - 1, seen by the queries of chunk
    pos // chunk + s, entry by entry where its position p <= t - W. Keys arrive already rotated.
    ``cu_seqlens`` (int32 [N + 1], a packed row of batch 1 at positions within documents, no
    cache and no store): a query sees only keys of its own document.
    Returns o [B, Tq, H, E] in q's dtype, differentiable in every float input.
    """
    _check(q, k, v, window, fading_k, fading_v, store_k, store_v, store_pos, chunk, pos)
    if q.shape[1] == 0:
        raise ValueError("windowed_readout: q must hold at least one query, got Tq = 0")
    docs = None if cu_seqlens is None else _docs(cu_seqlens, q, k, store_k, pos)
    if store_k is not None:
        store_pos = store_pos.to(torch.int64)
    return _WindowedReadout.apply(q, k, v, fading_k, fading_v, store_k, store_v, store_pos,
                                 window, pos, chunk, docs)


def windowed_readout_ref(q, k, v, window, fading_k=None, fading_v=None, store_k=None,
                        store_v=None, store_pos=None, chunk=None, pos=0, cu_seqlens=None):
    """The same function in plain torch, one query at a time (float32 or float64 inside)."""
    acc = acc_dtype(q.dtype)
    B, Tq, H, E = q.shape
    Tk = k.shape[1]
    kpos = torch.arange(Tk, device=q.device) + pos - (Tk - Tq)
    starts = torch.zeros(Tq, dtype=torch.int64, device=q.device) - Tk
    if cu_seqlens is not None:
        for a in cu_seqlens[:-1].tolist():
            starts[a:] = a
    outs = []
    for i in range(Tq):
        t = pos + i
        raw = (kpos <= t) & (kpos >= starts[i])
        if window is not None:
            raw = raw & (kpos > t - window)
        keys, vals = [k[:, raw]], [v[:, raw]]  # [B, n, H, E]
        if fading_k is not None:
            fad = (kpos <= t - window) & (kpos > t - 2 * window) & (kpos >= starts[i])
            keys.append(fading_k[:, fad])
            vals.append(fading_v[:, fad])
        n_plain = sum(x.shape[1] for x in keys)
        if store_k is not None:
            s = t // chunk - pos // chunk
            keys.append(store_k[:, :, s].permute(0, 2, 1, 3))
            vals.append(store_v[:, :, s].permute(0, 2, 1, 3))
        kk = torch.cat(keys, 1).to(acc)
        vv = torch.cat(vals, 1).to(acc)
        mask = torch.ones(B, kk.shape[1], dtype=torch.bool, device=q.device)
        if store_k is not None:
            sp = store_pos[:, s]
            mask[:, n_plain:] = (sp >= 0) & (sp <= t - window)
        sc = torch.einsum("bhe,bnhe->bhn", q[:, i].to(acc), kk) / math.sqrt(E)
        sc = sc.masked_fill(~mask[:, None, :], float("-inf"))
        vv = torch.where(mask[:, :, None, None], vv, 0.0)  # masked entries: never 0 * NaN
        # the kernel's softmax: a row whose scores are all -inf reads 0
        m = sc.amax(-1, keepdim=True)
        w = torch.exp(sc - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        den = w.sum(-1, keepdim=True)
        o = torch.einsum("bhn,bnhe->bhe", w / torch.where(den > 0, den, torch.ones_like(den)),
                         vv)
        # a row that sees a non-finite value is NaN in every channel, as the kernel writes it
        outs.append(o.masked_fill(~torch.isfinite(o).all(-1, keepdim=True), float("nan")))
    return torch.stack(outs, 1).to(q.dtype)
