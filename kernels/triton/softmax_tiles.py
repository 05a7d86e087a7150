"""The tile steps that the softmax readout kernels (``windowed_readout``, ``associative_readout``)
share: a program's query tile, the online softmax over key tiles with each row's log-sum-exp
(FlashAttention-2's forward), and the backward's gradient parts from probabilities recomputed
with that log-sum-exp. Rows are [B, T, H, E] with the program's (batch, head) as ``bh``; a score
scale, where a kernel has one, stays with the kernel, so the parts here come unscaled.
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    # IEEE: float32 without tf32 (DESIGN 6); 2: bfloat16 under the interpreter, whose dot reads
    # bfloat16 operands wrongly, so it gets float32 copies
    if IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def program_rows(H, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (row tile, b * H + h): the tile's first row, bh, b, h, its rows [BLOCK] and the
    indices of the head width [BLOCK_E]."""
    r0 = tl.program_id(0).to(tl.int64) * BLOCK
    bh = tl.program_id(1).to(tl.int64)
    return r0, bh, bh // H, bh % H, r0 + tl.arange(0, BLOCK).to(tl.int64), tl.arange(0, BLOCK_E)


@triton.jit
def rows(b, h, i, e, T, H, E):
    """Offsets of rows i of head h in a [B, T, H, E] tensor as a [len(i), BE] tile, and its mask."""
    off = ((b * T + i[:, None]) * H + h) * E + e[None, :]
    return off, (i[:, None] < T) & (e[None, :] < E)


@triton.jit
def backward_rows(q, do, lse, dlt, b, h, bh, i, e, T, H, E):
    """A backward's query side: offsets and mask of rows i, their q and do tiles, and their
    log-sum-exp and D = do . o."""
    off, ok = rows(b, h, i, e, T, H, E)
    qt = tl.load(q + off, mask=ok, other=0.0)
    dot_ = tl.load(do + off, mask=ok, other=0.0)
    lse_i = tl.load(lse + bh * T + i, mask=i < T, other=0.0)
    dlt_i = tl.load(dlt + bh * T + i, mask=i < T, other=0.0)
    return off, ok, qt, dot_, lse_i, dlt_i


@triton.jit
def finite_values(vt):
    """A value tile [BN, BE] with the rows that hold a non-finite entry zeroed, and which rows
    those are [BN]: ``tl.dot`` multiplies masked values by a weight of 0, and 0 * NaN = NaN
    would reach rows that cannot see them (DESIGN 6); the rows that can see them are marked
    instead (``visible_scores``). 0 * v is 0, or NaN for an infinite or NaN v."""
    bad = tl.sum(vt * 0.0, axis=1) != 0.0
    return tl.where(bad[:, None], 0.0, vt), bad


@triton.jit
def visible_scores(sc, vis, bad):
    """Scores for the online softmax: -inf where not visible, NaN where the visible key's
    value (a row of bad [BN]) is not finite, so that the row reads NaN: its weight is NaN,
    and NaN stays NaN through the rescaling, the sums and ``tl.dot``."""
    return tl.where(vis, tl.where(bad[None, :], float("nan"), sc), float("-inf"))


@triton.jit
def softmax_start(BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr):
    """The online softmax before any key: output 0, max -inf, sum 0 per row."""
    return (tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC), tl.full([BLOCK_M], float("-inf"), dtype=ACC),
            tl.zeros([BLOCK_M], dtype=ACC))


@triton.jit
def softmax_step(acc, m_i, l_i, sc, vt, IEEE: tl.constexpr, ACC: tl.constexpr):
    """Folds one key tile into the running output, max and sum of its rows: scores sc [BM, BN]
    (-inf where not visible) and values vt [BN, BE]."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    # a row with nothing visible yet keeps m = -inf; shift it by 0 so exp gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(sc - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, IEEE).to(ACC)
    return acc, m_new, l_i


@triton.jit
def store_rows(o, lse, off, ok, i, bh, T, acc, m_i, l_i):
    """The output acc / l and the log-sum-exp m + log l of rows i (0 and m for a row that saw
    no key; NaN where acc is, a row that saw a non-finite value)."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o + off, (acc / l_safe[:, None]).to(o.dtype.element_ty), mask=ok)
    tl.store(lse + bh * T + i, m_i + tl.log(l_safe), mask=i < T)


@triton.jit
def dq_part(sc, vis, lse_i, dlt_i, dot_, kt, vt, IEEE: tl.constexpr, ACC: tl.constexpr):
    """dq from one key tile: ds = p (dp - D) against the keys, p from the scores sc [BM, BN]."""
    p = tl.where(vis, tl.exp(sc - lse_i[:, None]), 0.0)
    dp = dot(dot_, tl.trans(vt), IEEE).to(ACC)
    ds = p * (dp - dlt_i[:, None])
    return dot(ds.to(kt.dtype), kt, IEEE).to(ACC)


@triton.jit
def dkdv_step(dv_acc, scT, vis, lse_i, dlt_i, dot_, vt, IEEE: tl.constexpr, ACC: tl.constexpr):
    """One query tile on transposed tiles [BN, BM] (keys along rows, queries along columns),
    scT the scores and vis their mask: dv_acc with the tile's dv added, and dsT, whose product
    with the queries is the tile's dk."""
    pT = tl.where(vis, tl.exp(scT - lse_i[None, :]), 0.0)
    dv_acc += dot(pT.to(dot_.dtype), dot_, IEEE).to(ACC)
    dpT = dot(vt, tl.trans(dot_), IEEE).to(ACC)
    return dv_acc, pT * (dpT - dlt_i[None, :])
