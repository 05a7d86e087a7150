"""Backward kernels of the windowed readout (``windowed_readout``, which launches them).

FlashAttention-2's backward: the probabilities are recomputed from the forward's row
log-sum-exp. ``_attn_dq_kernel`` walks the forward's tiles per query tile for dq;
``_attn_dkdv_kernel`` walks, per tile of one source's keys (``MODE``: raw, fading or a store
snapshot), the query tiles that can see them, for that source's dk and dv.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .softmax_tiles import backward_rows as _backward_rows
from .softmax_tiles import dkdv_step as _dkdv_step
from .softmax_tiles import dot as _dot
from .softmax_tiles import program_rows as _program_rows
from .windowed_readout import _doc_starts, _kv_ptrs, _load_kv, _sweep, _visible


@triton.jit
def _attn_dq_kernel(q, k, v, fk, fv, sk, sv, spos, docs, do, lse, dlt, dq,
                    Tq, Tk, H, E, S, M, W, pos, C, scale,
                    HAS_FADING: tl.constexpr, HAS_STORE: tl.constexpr, HAS_DOCS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                    IEEE: tl.constexpr, ACC: tl.constexpr):
    i0, bh, b, h, i, e = _program_rows(H, BLOCK_M, BLOCK_E)
    rows, q_ok, qt, dot_, lse_i, dlt_i = _backward_rows(q, do, lse, dlt, b, h, bh, i, e, Tq, H,
                                                        E)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    # the softmax's running max and sum are not needed: lse_i and dlt_i stand in
    acc, _, _ = _sweep(acc, lse_i, dlt_i, qt, dot_, lse_i, dlt_i, i0, i, k, v, fk, fv, sk, sv,
                       spos, docs, b, h, Tq, Tk, H, E, S, M, W, pos, C, scale, HAS_FADING,
                       HAS_STORE, HAS_DOCS, True, BLOCK_M, BLOCK_N, BLOCK_E, IEEE, ACC)
    tl.store(dq + rows, acc, mask=q_ok)


@triton.jit
def _attn_dkdv_kernel(q, kb, vb, spos, docs, do, lse, dlt, dk, dv,
                      Tq, Tk, H, E, S, M, W, pos, C, scale,
                      MODE: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
                      ACC: tl.constexpr):
    """Gradients of one source's keys and values: program (key tile [x snapshot], b * H + h).
    In a packed row (``HAS_DOCS``: ``docs`` [2, T], each position's document start and end)
    the query tiles after the last key's document are skipped."""
    pid = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    off = Tk - Tq
    e = tl.arange(0, BLOCK_E)
    if MODE == 2:
        n_tiles = tl.cdiv(M, BLOCK_N)
        s = pid // n_tiles
        j0 = (pid % n_tiles) * BLOCK_N
        c_abs = pos // C + s
        i_lo = tl.maximum(c_abs * C - pos, 0)
        i_hi = tl.minimum((c_abs + 1) * C - pos, Tq)
    else:
        s = pid * 0
        j0 = pid * BLOCK_N
        j_last = tl.minimum(j0 + BLOCK_N, Tk) - 1
        if MODE == 0:
            i_lo = tl.maximum(j0 - off, 0)
            i_hi = tl.minimum(j_last - off + W, Tq)
        else:
            i_lo = tl.maximum(j0 - off + W, 0)
            i_hi = tl.minimum(j_last - off + 2 * W, Tq)
        if HAS_DOCS:  # no query after the last key's document sees the tile
            i_hi = tl.minimum(i_hi, tl.load(docs + Tq + tl.maximum(j_last, 0)))
    j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    kt, vt, sp = _load_kv(MODE, kb, vb, spos, j, e, b, h, s, H, E, Tk, S, M)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    for i0 in range(i_lo, i_hi, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        _, _, qt, dot_, lse_i, dlt_i = _backward_rows(q, do, lse, dlt, b, h, bh, i, e, Tq, H, E)
        s_q = (pos + i) // C - pos // C
        kst = _doc_starts(docs, i, Tq, HAS_DOCS)
        # transposed tiles [BN, BM]: keys along rows, queries along columns
        scT = _dot(kt, tl.trans(qt), IEEE).to(ACC) * scale
        vis = _visible(MODE, i[None, :], j[:, None], sp[:, None], s_q[None, :], s, off, W, pos,
                       Tq, Tk, M, kst[None, :])
        dv_acc, dsT = _dkdv_step(dv_acc, scT, vis, lse_i, dlt_i, dot_, vt, IEEE, ACC)
        dk_acc += _dot(dsT.to(qt.dtype), qt, IEEE).to(ACC) * scale
    if MODE == 2:
        row_ok = j < M
    else:
        row_ok = j < Tk
    kv_ok = row_ok[:, None] & (e[None, :] < E)
    dkp, dvp = _kv_ptrs(MODE, dk, dv, j, e, b, h, s, H, E, Tk, S, M)
    tl.store(dkp, dk_acc, mask=kv_ok)
    tl.store(dvp, dv_acc, mask=kv_ok)
