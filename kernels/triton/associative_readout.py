"""Memory Mosaics' associative readout (DESIGN 2.5), forward and backward, in Triton.

Per head, with the keys doubling as queries and no 1/sqrt(E) scale:

    y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j        y_0 = 0 (nothing to read)

k, v: [B, T, H, E]; M the optional capacity (None: every earlier position). One program owns a
tile of query rows of one (batch, head) and runs an online softmax over the key tiles that the
band can reach, so tiles wholly above the diagonal or below the band are never visited and no
T x T matrix is formed. The forward keeps the row's log-sum-exp; the backward recomputes the
probabilities (FlashAttention-2). k receives two gradients, one as a query (a kernel over query
tiles) and one as a key (a kernel over key tiles, which also gives dv); they are summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import TileConfig, acc_dtype, check_device, check_float, empty
from .windowed_readout import _dot


@triton.jit
def _band(i, j, T, CAP, HAS_CAP: tl.constexpr):
    """Query row i sees key row j: strictly earlier, inside the capacity, inside [0, T)."""
    m = (j <= i - 1) & (j >= 0) & (i < T)
    if HAS_CAP:
        m = m & (j >= i - CAP)
    return m


@triton.jit
def _key_range(i0, i_last, CAP, HAS_CAP: tl.constexpr):
    """First and one-past-last key index that some row of [i0, i_last] can see."""
    lo = i0 * 0
    if HAS_CAP:
        lo = tl.maximum(i0 - CAP, 0)
    return lo, i_last


@triton.jit
def _readout_fwd_kernel(k, v, o, lse, T, H, E, CAP, HAS_CAP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                        IEEE: tl.constexpr, ACC: tl.constexpr):
    i0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    rows = ((b * T + i[:, None]) * H + h) * E + e[None, :]
    q_ok = (i[:, None] < T) & (e[None, :] < E)
    qt = tl.load(k + rows, mask=q_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    lo, hi = _key_range(i0, tl.minimum(i0 + BLOCK_M, T) - 1, CAP, HAS_CAP)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cols = ((b * T + j[:, None]) * H + h) * E + e[None, :]
        kv_ok = (j[:, None] < T) & (e[None, :] < E)
        kt = tl.load(k + cols, mask=kv_ok, other=0.0)
        vt = tl.load(v + cols, mask=kv_ok, other=0.0)
        sc = _dot(qt, tl.trans(kt), IEEE).to(ACC)  # [BM, BN]
        sc = tl.where(_band(i[:, None], j[None, :], T, CAP, HAS_CAP), sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        # a row with nothing visible yet keeps m = -inf; shift it by 0 so exp gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE).to(ACC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o + rows, (acc / l_safe[:, None]).to(o.dtype.element_ty), mask=q_ok)
    tl.store(lse + bh * T + i, m_i + tl.log(l_safe), mask=i < T)


@triton.jit
def _readout_dq_kernel(k, v, do, lse, dlt, dkq, T, H, E, CAP, HAS_CAP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                       IEEE: tl.constexpr, ACC: tl.constexpr):
    """Gradient of k in its role as the query, over query tiles."""
    i0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    rows = ((b * T + i[:, None]) * H + h) * E + e[None, :]
    q_ok = (i[:, None] < T) & (e[None, :] < E)
    qt = tl.load(k + rows, mask=q_ok, other=0.0)
    dot_ = tl.load(do + rows, mask=q_ok, other=0.0)
    lse_i = tl.load(lse + bh * T + i, mask=i < T, other=0.0)
    dlt_i = tl.load(dlt + bh * T + i, mask=i < T, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    lo, hi = _key_range(i0, tl.minimum(i0 + BLOCK_M, T) - 1, CAP, HAS_CAP)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cols = ((b * T + j[:, None]) * H + h) * E + e[None, :]
        kv_ok = (j[:, None] < T) & (e[None, :] < E)
        kt = tl.load(k + cols, mask=kv_ok, other=0.0)
        vt = tl.load(v + cols, mask=kv_ok, other=0.0)
        sc = _dot(qt, tl.trans(kt), IEEE).to(ACC)
        vis = _band(i[:, None], j[None, :], T, CAP, HAS_CAP)
        p = tl.where(vis, tl.exp(sc - lse_i[:, None]), 0.0)
        dp = _dot(dot_, tl.trans(vt), IEEE).to(ACC)
        ds = p * (dp - dlt_i[:, None])
        acc += _dot(ds.to(kt.dtype), kt, IEEE).to(ACC)
    tl.store(dkq + rows, acc, mask=q_ok)


@triton.jit
def _readout_dkdv_kernel(k, v, do, lse, dlt, dkk, dv, T, H, E, CAP, HAS_CAP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         IEEE: tl.constexpr, ACC: tl.constexpr):
    """Gradients of k in its role as the key, and of v, over key tiles."""
    j0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    cols = ((b * T + j[:, None]) * H + h) * E + e[None, :]
    kv_ok = (j[:, None] < T) & (e[None, :] < E)
    kt = tl.load(k + cols, mask=kv_ok, other=0.0)
    vt = tl.load(v + cols, mask=kv_ok, other=0.0)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    # the queries that see these keys: strictly later, and within the capacity of the last key
    i_lo = j0 + 1
    i_hi = T
    if HAS_CAP:
        i_hi = tl.minimum(tl.minimum(j0 + BLOCK_N, T) - 1 + CAP + 1, T)
    for i0 in range(i_lo, i_hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rows = ((b * T + i[:, None]) * H + h) * E + e[None, :]
        q_ok = (i[:, None] < T) & (e[None, :] < E)
        qt = tl.load(k + rows, mask=q_ok, other=0.0)
        dot_ = tl.load(do + rows, mask=q_ok, other=0.0)
        lse_i = tl.load(lse + bh * T + i, mask=i < T, other=0.0)
        dlt_i = tl.load(dlt + bh * T + i, mask=i < T, other=0.0)
        # transposed tiles [BN, BM]: keys along rows, queries along columns
        scT = _dot(kt, tl.trans(qt), IEEE).to(ACC)
        vis = _band(i[None, :], j[:, None], T, CAP, HAS_CAP)
        pT = tl.where(vis, tl.exp(scT - lse_i[None, :]), 0.0)
        dv_acc += _dot(pT.to(dot_.dtype), dot_, IEEE).to(ACC)
        dpT = _dot(vt, tl.trans(dot_), IEEE).to(ACC)
        dsT = pT * (dpT - dlt_i[None, :])
        dk_acc += _dot(dsT.to(qt.dtype), qt, IEEE).to(ACC)
    tl.store(dkk + cols, dk_acc, mask=kv_ok)
    tl.store(dv + cols, dv_acc, mask=kv_ok)


class _Cfg(TileConfig):
    """Sizes and flags of one call's kernels."""

    def __init__(self, k, capacity):
        super().__init__(k.dtype, k.shape[3], _readout_fwd_kernel, k.device)
        self.B, self.T, self.H, self.E = k.shape
        self.has_cap = capacity is not None
        self.cap = capacity if capacity is not None else 0

    def args(self):
        return (self.T, self.H, self.E, self.cap)

    def flags(self):
        return dict(HAS_CAP=self.has_cap, BLOCK_M=self.BM, BLOCK_N=self.BN, BLOCK_E=self.BE,
                    IEEE=self.ieee, ACC=self.acc)


class _AssociativeReadout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, capacity):
        k, v = k.contiguous(), v.contiguous()
        cfg = _Cfg(k, capacity)
        o = empty(k.shape, k.dtype, k.device)
        lse = empty((cfg.B, cfg.H, cfg.T), acc_dtype(k.dtype), k.device)
        _readout_fwd_kernel[(triton.cdiv(cfg.T, cfg.BM), cfg.B * cfg.H)](
            k, v, o, lse, *cfg.args(), **cfg.flags())
        ctx.save_for_backward(k, v, o, lse)
        ctx.cfg = cfg
        return o

    @staticmethod
    def backward(ctx, do):
        k, v, o, lse = ctx.saved_tensors
        cfg = ctx.cfg
        acc = acc_dtype(k.dtype)
        do = do.contiguous()
        # D_i = do_i . o_i, the softmax's row correction, as [B, H, T]
        dlt = (do.to(acc) * o.to(acc)).sum(-1).permute(0, 2, 1).contiguous()
        dkq = empty(k.shape, acc, k.device)
        dkk = empty(k.shape, acc, k.device)
        dv = empty(v.shape, acc, k.device)
        _readout_dq_kernel[(triton.cdiv(cfg.T, cfg.BM), cfg.B * cfg.H)](
            k, v, do, lse, dlt, dkq, *cfg.args(), **cfg.flags())
        _readout_dkdv_kernel[(triton.cdiv(cfg.T, cfg.BN), cfg.B * cfg.H)](
            k, v, do, lse, dlt, dkk, dv, *cfg.args(), **cfg.flags())
        return (dkq + dkk).to(k.dtype), dv.to(v.dtype), None


def _check(k, v, capacity):
    where = "associative_readout"
    check_float(where, "k", k)
    check_float(where, "v", v)
    check_device(where, k, v=v)
    if k.ndim != 4:
        raise ValueError(f"{where}: k must be [B, T, H, E], got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{where}: v must have k's shape {tuple(k.shape)}, got "
                         f"{tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"{where}: v must have k's dtype {k.dtype}, got {v.dtype}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 0):
        raise ValueError(f"{where}: capacity must be a non-negative int or None, got "
                         f"{capacity!r}")


def associative_readout(k, v, capacity=None):
    """y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j, no scale, y_0 = 0.

    k, v: [B, T, H, E] of one dtype (keys double as queries); capacity: M, or None for every
    earlier position. Returns y [B, T, H, E] in k's dtype, differentiable in k and v. Same
    function as ``memcore.spec.reference.associative_readout``.
    """
    _check(k, v, capacity)
    if k.shape[1] == 0 or k.shape[0] * k.shape[2] == 0:
        return torch.zeros_like(k) + 0 * v  # keeps the autograd graph for empty inputs
    return _AssociativeReadout.apply(k, v, capacity)


def associative_readout_ref(k, v, capacity=None):
    """The same function in plain torch with a dense masked T x T softmax."""
    acc = acc_dtype(k.dtype)
    T = k.shape[1]
    kk = k.to(acc).permute(0, 2, 1, 3)
    vv = v.to(acc).permute(0, 2, 1, 3)
    i = torch.arange(T, device=k.device)
    mask = i[None, :] <= i[:, None] - 1
    if capacity is not None:
        mask = mask & (i[None, :] >= i[:, None] - capacity)
    sc = (kk @ kk.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    m = sc.amax(-1, keepdim=True)
    w = torch.exp(sc - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = w.sum(-1, keepdim=True)
    y = (w / torch.where(den > 0, den, torch.ones_like(den))) @ vv
    return y.permute(0, 2, 1, 3).to(k.dtype)
