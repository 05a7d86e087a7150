"""Memory Mosaics' associative readout (DESIGN 2.5), forward and backward, in Triton.

Per head, with the keys doubling as queries and no 1/sqrt(E) scale:

    y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j        y_0 = 0 (nothing to read)

k, v: [B, T, H, E]; M the optional capacity (None: every earlier position). In a packed row
(``cu_seqlens``, DESIGN 5a) j is also limited to t's document, so each document's first token
reads nothing, as position 0 does. One program owns a tile of query rows of one (batch, head)
and runs an online softmax over the key tiles that the band can reach, so tiles wholly above
the diagonal, below the band or before the tile's documents are never visited and no T x T
matrix is formed. The forward keeps the row's log-sum-exp; the backward recomputes the
probabilities (FlashAttention-2). k receives two gradients, one as a query (a kernel over query
tiles) and one as a key (a kernel over key tiles, which also gives dv); they are summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import TileConfig, acc_dtype, check_device, check_float, check_same_shape, empty
from .softmax_tiles import backward_rows as _backward_rows
from .softmax_tiles import dkdv_step as _dkdv_step
from .softmax_tiles import dot as _dot
from .softmax_tiles import dq_part as _dq_part
from .softmax_tiles import finite_values as _finite_values
from .softmax_tiles import program_rows as _program_rows
from .softmax_tiles import rows as _rows
from .softmax_tiles import softmax_start as _softmax_start
from .softmax_tiles import softmax_step as _softmax_step
from .softmax_tiles import store_rows as _store_rows
from .softmax_tiles import visible_scores as _visible_scores


@triton.jit
def _band(i, j, T, CAP, kst, HAS_CAP: tl.constexpr):
    """Query row i sees key row j: strictly earlier, inside the capacity, inside [0, T), and
    from the query's first key index kst on (its document's first token, else 0)."""
    m = (j <= i - 1) & (j >= kst) & (i < T)
    if HAS_CAP:
        m = m & (j >= i - CAP)
    return m


@triton.jit
def _doc_starts(docs, i, T, HAS_DOCS: tl.constexpr):
    """Each query's first key index [len(i)]: its document's first token (``docs`` row 0) in
    a packed row, else 0."""
    if HAS_DOCS:
        return tl.load(docs + i, mask=i < T, other=0)
    return i * 0


@triton.jit
def _keys(k, v, b, h, j, e, T, H, E):
    """Rows j as key and value tiles [BN, BE], with their offsets and mask."""
    cols, kv_ok = _rows(b, h, j, e, T, H, E)
    return cols, kv_ok, tl.load(k + cols, mask=kv_ok, other=0.0), tl.load(v + cols, mask=kv_ok,
                                                                           other=0.0)


@triton.jit
def _sweep(acc, m_i, l_i, qt, dot_, lse_i, dlt_i, k, v, docs, b, h, i0, i, e, T, H, E, CAP,
           HAS_CAP: tl.constexpr, HAS_DOCS: tl.constexpr, GRAD: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
           ACC: tl.constexpr):
    """Every key tile that some row of the query tile can see, folded into the online softmax
    (acc, m_i, l_i), or with GRAD into dq (acc; m_i and l_i pass through): the gradient walks
    the forward's tiles. In a packed row (``HAS_DOCS``) the tiles before the first row's
    document are skipped."""
    kst = _doc_starts(docs, i, T, HAS_DOCS)
    lo = i0 * 0
    if HAS_DOCS:
        lo = tl.min(tl.where(i < T, kst, T), axis=0)
    if HAS_CAP:
        lo = tl.maximum(tl.maximum(i0 - CAP, 0), lo)
    for j0 in range(lo, tl.minimum(i0 + BLOCK_M, T) - 1, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        _, _, kt, vt = _keys(k, v, b, h, j, e, T, H, E)
        sc = _dot(qt, tl.trans(kt), IEEE).to(ACC)  # [BM, BN]
        vis = _band(i[:, None], j[None, :], T, CAP, kst[:, None], HAS_CAP)
        if GRAD:
            acc = acc + _dq_part(sc, vis, lse_i, dlt_i, dot_, kt, vt, IEEE, ACC)
        else:  # the gradient may be NaN where a value is; the forward is causal for it
            vt, bad = _finite_values(vt)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, _visible_scores(sc, vis, bad), vt, IEEE,
                                          ACC)
    return acc, m_i, l_i


@triton.jit
def _readout_fwd_kernel(k, v, docs, o, lse, T, H, E, CAP, HAS_CAP: tl.constexpr,
                        HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_E: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    i0, bh, b, h, i, e = _program_rows(H, BLOCK_M, BLOCK_E)
    rows, q_ok = _rows(b, h, i, e, T, H, E)
    qt = tl.load(k + rows, mask=q_ok, other=0.0)
    acc, m_i, l_i = _softmax_start(BLOCK_M, BLOCK_E, ACC)
    # the gradient's do, lse and D are not read here: qt and m_i stand in
    acc, m_i, l_i = _sweep(acc, m_i, l_i, qt, qt, m_i, m_i, k, v, docs, b, h, i0, i, e, T, H, E,
                           CAP, HAS_CAP, HAS_DOCS, False, BLOCK_M, BLOCK_N, IEEE, ACC)
    _store_rows(o, lse, rows, q_ok, i, bh, T, acc, m_i, l_i)


@triton.jit
def _readout_dq_kernel(k, v, docs, do, lse, dlt, dkq, T, H, E, CAP, HAS_CAP: tl.constexpr,
                       HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_E: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """Gradient of k in its role as the query, over query tiles."""
    i0, bh, b, h, i, e = _program_rows(H, BLOCK_M, BLOCK_E)
    rows, q_ok, qt, dot_, lse_i, dlt_i = _backward_rows(k, do, lse, dlt, b, h, bh, i, e, T, H, E)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    # the softmax's running max and sum are not needed: lse_i and dlt_i stand in
    acc, _, _ = _sweep(acc, lse_i, dlt_i, qt, dot_, lse_i, dlt_i, k, v, docs, b, h, i0, i, e, T,
                       H, E, CAP, HAS_CAP, HAS_DOCS, True, BLOCK_M, BLOCK_N, IEEE, ACC)
    tl.store(dkq + rows, acc, mask=q_ok)


@triton.jit
def _readout_dkdv_kernel(k, v, docs, do, lse, dlt, dkk, dv, T, H, E, CAP,
                         HAS_CAP: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
                         ACC: tl.constexpr):
    """Gradients of k in its role as the key, and of v, over key tiles. In a packed row
    (``HAS_DOCS``: ``docs`` [2, T], each position's document start and end) the query tiles
    after the last key's document are skipped."""
    j0, bh, b, h, j, e = _program_rows(H, BLOCK_N, BLOCK_E)
    cols, kv_ok, kt, vt = _keys(k, v, b, h, j, e, T, H, E)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    # the queries that see these keys: strictly later, and within the capacity of the last key
    i_lo = j0 + 1
    i_hi = T
    if HAS_CAP:
        i_hi = tl.minimum(tl.minimum(j0 + BLOCK_N, T) - 1 + CAP + 1, T)
    if HAS_DOCS:
        i_hi = tl.minimum(i_hi, tl.load(docs + T + tl.minimum(j0 + BLOCK_N, T) - 1))
    for i0 in range(i_lo, i_hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        _, _, qt, dot_, lse_i, dlt_i = _backward_rows(k, do, lse, dlt, b, h, bh, i, e, T, H, E)
        # transposed tiles [BN, BM]: keys along rows, queries along columns
        scT = _dot(kt, tl.trans(qt), IEEE).to(ACC)
        kst = _doc_starts(docs, i, T, HAS_DOCS)
        vis = _band(i[None, :], j[:, None], T, CAP, kst[None, :], HAS_CAP)
        dv_acc, dsT = _dkdv_step(dv_acc, scT, vis, lse_i, dlt_i, dot_, vt, IEEE, ACC)
        dk_acc += _dot(dsT.to(qt.dtype), qt, IEEE).to(ACC)
    tl.store(dkk + cols, dk_acc, mask=kv_ok)
    tl.store(dv + cols, dv_acc, mask=kv_ok)


class _Cfg(TileConfig):
    """Sizes and flags of one call's kernels."""

    def __init__(self, k, capacity, docs):
        super().__init__(k.dtype, k.shape[3], _readout_fwd_kernel, k.device)
        self.B, self.T, self.H, self.E = k.shape
        self.has_cap = capacity is not None
        self.cap = capacity if capacity is not None else 0
        self.has_docs = docs is not None

    def args(self):
        return (self.T, self.H, self.E, self.cap)

    def flags(self):
        return dict(HAS_CAP=self.has_cap, HAS_DOCS=self.has_docs, BLOCK_M=self.BM,
                    BLOCK_N=self.BN, BLOCK_E=self.BE, IEEE=self.ieee, ACC=self.acc)


class _AssociativeReadout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, capacity, docs):
        k, v = k.contiguous(), v.contiguous()
        cfg = _Cfg(k, capacity, docs)
        o = empty(k.shape, k.dtype, k.device)
        lse = empty((cfg.B, cfg.H, cfg.T), acc_dtype(k.dtype), k.device)
        docs = docs if docs is not None else lse  # never read without HAS_DOCS
        _readout_fwd_kernel[(triton.cdiv(cfg.T, cfg.BM), cfg.B * cfg.H)](
            k, v, docs, o, lse, *cfg.args(), **cfg.flags())
        ctx.save_for_backward(k, v, docs, o, lse)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        k, v, docs, o, lse = ctx.saved_tensors
        cfg = ctx.cfg
        acc = acc_dtype(k.dtype)
        do = do.contiguous()
        # D_i = do_i . o_i, the softmax's row correction, as [B, H, T]
        dlt = (do.to(acc) * o.to(acc)).sum(-1).permute(0, 2, 1).contiguous()
        dkq = empty(k.shape, acc, k.device)
        dkk = empty(k.shape, acc, k.device)
        dv = empty(v.shape, acc, k.device)
        _readout_dq_kernel[(triton.cdiv(cfg.T, cfg.BM), cfg.B * cfg.H)](
            k, v, docs, do, lse, dlt, dkq, *cfg.args(), **cfg.flags())
        _readout_dkdv_kernel[(triton.cdiv(cfg.T, cfg.BN), cfg.B * cfg.H)](
            k, v, docs, do, lse, dlt, dkk, dv, *cfg.args(), **cfg.flags())
        return (dkq + dkk).to(k.dtype), dv.to(v.dtype), None, None


def _check(k, v, capacity):
    where = "associative_readout"
    check_float(where, "k", k)
    check_float(where, "v", v)
    check_device(where, k, v=v)
    if k.ndim != 4:
        raise ValueError(f"{where}: k must be [B, T, H, E], got shape {tuple(k.shape)}")
    check_same_shape(where, "v", v, "k", k)
    if v.dtype != k.dtype:
        raise TypeError(f"{where}: v must have k's dtype {k.dtype}, got {v.dtype}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 0):
        raise ValueError(f"{where}: capacity must be a non-negative int or None, got "
                         f"{capacity!r}")


def _docs(cu_seqlens, k):
    """[2, T] int64 on k's device: each position's document start and end (exclusive), from
    ``cu_seqlens``, checked: int32 [N + 1], 0, strictly increasing, T; batch 1."""
    where = "associative_readout"
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(
            cu_seqlens).__name__
        raise ValueError(f"{where}: cu_seqlens must be an int32 tensor, got {got}")
    if k.shape[0] != 1:
        raise ValueError(f"{where}: cu_seqlens takes one packed row (batch 1), got batch "
                         f"{k.shape[0]}")
    T = k.shape[1]
    cu = cu_seqlens.to(device=k.device, dtype=torch.int64)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"{where}: cu_seqlens must be 1-D [N + 1] with N >= 1, got shape "
                         f"{tuple(cu.shape)}")
    if int(cu[0]) != 0 or int(cu[-1]) != T or not bool((cu[1:] > cu[:-1]).all()):
        raise ValueError(f"{where}: cu_seqlens must start at 0, be strictly increasing and "
                         f"end at T={T}, got {cu_seqlens.tolist()}")
    lengths = cu[1:] - cu[:-1]
    return torch.stack([cu[:-1].repeat_interleave(lengths),
                        cu[1:].repeat_interleave(lengths)]).contiguous()


def associative_readout(k, v, capacity=None, cu_seqlens=None):
    """y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j, no scale, y_0 = 0.

    k, v: [B, T, H, E] of one dtype (keys double as queries); capacity: M, or None for every
    earlier position. ``cu_seqlens`` (int32 [N + 1], a packed row of batch 1): j only from
    t's document, so each document's first token reads 0. Returns y [B, T, H, E] in k's dtype,
    differentiable in k and v. Same function as ``memcore.spec.reference.associative_readout``.
    """
    _check(k, v, capacity)
    docs = None if cu_seqlens is None else _docs(cu_seqlens, k)
    if k.shape[1] == 0 or k.shape[0] * k.shape[2] == 0:
        return torch.zeros_like(k) + 0 * v  # keeps the autograd graph for empty inputs
    return _AssociativeReadout.apply(k, v, capacity, docs)


def associative_readout_ref(k, v, capacity=None, cu_seqlens=None):
    """The same function in plain torch with a dense masked T x T softmax."""
    acc = acc_dtype(k.dtype)
    T = k.shape[1]
    kk = k.to(acc).permute(0, 2, 1, 3)
    vv = v.to(acc).permute(0, 2, 1, 3)
    i = torch.arange(T, device=k.device)
    mask = i[None, :] <= i[:, None] - 1
    if capacity is not None:
        mask = mask & (i[None, :] >= i[:, None] - capacity)
    if cu_seqlens is not None:
        start = _docs(cu_seqlens, k)[0]
        mask = mask & (i[None, :] >= start[:, None])
    sc = (kk @ kk.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    m = sc.amax(-1, keepdim=True)
    w = torch.exp(sc - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = w.sum(-1, keepdim=True)
    # values read with non-finite entries zeroed; a row that sees one reads NaN
    ok = torch.isfinite(vv)
    seen = (mask & ~ok.all(-1)[..., None, :]).any(-1, keepdim=True)
    y = (w / torch.where(den > 0, den, torch.ones_like(den))) @ torch.where(ok, vv, 0.0)
    y = y.masked_fill(seen, float("nan"))
    return y.permute(0, 2, 1, 3).to(k.dtype)
