"""The windowed readout (DESIGN 2.3 and 2.4, B'MOJO's attention) for JAX, forward in Pallas.

One online softmax (scale 1/sqrt(E)) per query over

    raw     keys at positions (t - W, t]          (k, v)
    fading  keys at positions (t - 2W, t - W]     (fading_k, fading_v)
    store   entries of the snapshot of t's chunk with position p <= t - W  (store_k, store_v)

Forward: one program per (batch, head, tile of BLOCK queries). It walks only the key tiles that
can hold a visible key (loops with bounds computed from the tile's first and last query) and
only the store snapshots of the chunks the tile's queries fall in,
so the work is O(T W) and no T x T matrix is formed; with ``window=None`` (full causal attention)
it walks every tile up to the diagonal. Accumulation is float32 (float64 for float64 inputs).

Backward: without a store, Pallas kernels (``windowed_readout_bwd``: dq, and dk/dv per source,
recomputing probabilities from the forward's row log-sum-exp). With a store, the VJP of
``windowed_readout_ref``, a plain-JAX recomputation that is banded too: each query tile meets a
gathered band of BLOCK + span keys (span = W, or 2W with the fading source) and each query its
snapshot's M entries, so memory stays O(T (BLOCK + 2W + M)) for a bounded window.

Layouts: q [B, Tq, H, E]; k, v, fading_k, fading_v [B, Tk, H, E] with Tk >= Tq, key j at
position pos - (Tk - Tq) + j, so a cache of earlier keys can precede the queries' own;
store_k, store_v [B, H, S, M, E] with store_pos [B, S, M] (negative: empty slot), snapshot s
serving the queries of chunk pos // chunk + s (the layout of the Triton kernel).

Packed rows (``cu_seqlens``, as the Triton kernel takes them: batch 1, the row's own keys from
position 0, no store): each query's document start, int32 [Tq], is a kernel input, and keys
before it are masked in every source (and key tiles wholly before the query tile's first
document skipped). Distances within a document equal those in the row, so the windows are
those of the documents run alone. The boundaries may be traced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from .windowed_readout_args import check, check_cu_seqlens

BLOCK = 16  # queries per program and keys per tile


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def compiler_params(block: int, Ep: int):
    """Triton settings for tiles of ``block`` rows by ``Ep`` columns. Triton's software
    pipeline keeps num_stages copies of the loaded tiles in shared memory: built for sm_80 with
    3 stages, 64 x 64 tiles need 98 KB (forward) and 115 KB (dq), but 64 x 128 tiles need 180 KB
    and 213 KB, past an A100's 163 KB per block (an H100 has 227 KB); 2 stages bring them to
    115 KB and 147 KB. Larger tiles therefore get 2 stages."""
    stages = 3 if block * Ep <= 64 * 64 else 2
    return pl_triton.CompilerParams(num_warps=4, num_stages=stages)


def doc_starts(cu_seqlens, T: int):
    """Each position's document start, int32 [T], from cu_seqlens [N + 1] (may be traced)."""
    cu = cu_seqlens.astype(jnp.int32)
    seg = jnp.searchsorted(cu[1:], jnp.arange(T, dtype=jnp.int32), side="right")
    return cu[jnp.minimum(seg, cu.shape[0] - 2)]


def pad_docs(docs, Tqp: int):
    """Document starts [Tq] -> [Tqp]; padded query rows start at Tq (they see nothing)."""
    Tq = docs.shape[0]
    return jnp.pad(docs.astype(jnp.int32), (0, Tqp - Tq), constant_values=Tq)


def row_starts(kstart, docs):
    """(first visible key index of each query row [BQ, 1], least over the tile): ``key_start``,
    or in a packed row also the rows' document starts ``docs`` [BQ] (None: unpacked)."""
    if docs is None:
        return kstart, kstart
    st = jnp.maximum(docs[:, None], kstart)  # [BQ, 1]
    return st, jnp.min(st)


def _attn_kernel(*refs, W, off, Tk, scale, fading, store, C, S, block, acc, precision,
                 packed=False):
    refs = list(refs)
    meta_ref = refs.pop(0)
    docs_ref = refs.pop(0) if packed else None
    q_ref, k_ref, v_ref = refs[:3]
    fk_ref, fv_ref = refs[3:5] if fading else (None, None)
    sk_ref, sv_ref, sp_ref = refs[-5:-2] if store else (None, None, None)
    o_ref, lse_ref = refs[-2:]
    pos = meta_ref[0]  # run-time scalars: one compilation serves any pos
    i0 = pl.program_id(2) * block
    q = q_ref[...].astype(acc)  # [BQ, E]
    i = i0 + lax.broadcasted_iota(jnp.int32, (block, 1), 0)  # query rows [BQ, 1]
    jj = lax.broadcasted_iota(jnp.int32, (1, block), 1)  # key columns [1, BK]
    # first visible key index per row, and for the tile
    kst, kstart = row_starts(meta_ref[1], None if docs_ref is None else docs_ref[...])

    def update(carry, s, vis, vt):
        """One online-softmax step over the scores s [BQ, BK] where vis holds."""
        m, l, o, bad = carry
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        # a row with nothing visible yet keeps m = -inf: shift by 0 so exp gives 0, not NaN
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=1, keepdims=True)
        # The dot mixes every key of the tile into every row, and a masked p = 0 times a NaN
        # or an infinity is NaN: zero such values, and flag the rows that can see one.
        finite = jnp.isfinite(vt)
        key_bad = jnp.max((~finite).astype(acc), axis=1)  # [BK]
        bad = jnp.maximum(bad, jnp.max(jnp.where(vis, key_bad[None, :], 0.0), axis=1,
                                       keepdims=True))
        vt = jnp.where(finite, vt, 0.0)
        o = o * alpha + jnp.dot(p, vt, precision=precision, preferred_element_type=acc)
        return m_new, l, o, bad

    def scores(kt):
        return jnp.dot(q, kt.T, precision=precision, preferred_element_type=acc) * scale

    def visit(kr, vr, lo_off, hi_off, carry):
        """Keys j with i + off - hi_off < j <= i + off - lo_off (hi_off None: no lower bound)."""
        lo = kstart if hi_off is None else jnp.maximum(i0 + off - hi_off + 1, kstart)
        first = lo // block
        last = jnp.minimum(i0 + block - 1 + off - lo_off, Tk - 1) // block  # may be < first

        def tile(t, carry):
            j = t * block + jj
            kt = kr[pl.ds(t * block, block), :].astype(acc)
            vt = vr[pl.ds(t * block, block), :].astype(acc)
            vis = (j <= i + off - lo_off) & (j < Tk) & (j >= kst)
            if hi_off is not None:
                vis = vis & (j > i + off - hi_off)
            return update(carry, scores(kt), vis, vt)

        return lax.fori_loop(first, last + 1, tile, carry)

    def visit_store(carry):
        """The snapshots serving this tile's chunks: slot p visible from t if 0 <= p <= t - W."""
        s_q = (pos + i) // C - pos // C  # [BQ, 1]
        first = (pos + i0) // C - pos // C
        last = jnp.minimum((pos + i0 + block - 1) // C - pos // C, S - 1)

        def snapshot(sn, carry):
            sp = sp_ref[sn, :][None, :]  # [1, M]
            vis = (sp >= 0) & (sp <= pos + i - W) & (s_q == sn)
            return update(carry, scores(sk_ref[sn, :, :].astype(acc)), vis,
                          sv_ref[sn, :, :].astype(acc))

        return lax.fori_loop(first, last + 1, snapshot, carry)

    # carry: row max, row sum, output rows, and whether a visible value was not finite
    carry = (jnp.full((block, 1), -jnp.inf, acc), jnp.zeros((block, 1), acc),
             jnp.zeros(q.shape, acc), jnp.zeros((block, 1), acc))
    carry = visit(k_ref, v_ref, 0, W, carry)
    if fading:
        carry = visit(fk_ref, fv_ref, W, 2 * W, carry)
    if store:
        carry = visit_store(carry)
    m, l, o, bad = carry
    # A row with nothing visible reads 0; a NaN sum (a visible score was NaN or +inf) stays NaN.
    o = jnp.where(l == 0, 0.0, o / jnp.where(l == 0, 1.0, l))
    o_ref[...] = jnp.where(bad > 0, jnp.nan, o).astype(o_ref.dtype)
    # log-sum-exp of each row for the backward (0 where nothing is visible: padded rows)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)[:, 0]


def _pad_bhte(x, T, E):
    """[B, T0, H, E0] -> [B, H, T, E] zero-padded."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, [(0, 0), (0, 0), (0, T - x.shape[2]), (0, E - x.shape[3])])


def _forward(q, k, v, fk, fv, sk, sv, spos, meta, docs, window, chunk, interpret, poison,
             block):
    B, Tq, H, E = q.shape
    Tk = k.shape[1]
    fading, store = fk is not None, sk is not None
    Ep = max(16, _pow2(E))  # tl.dot on GPUs wants tiles of at least 16
    Tqp = -(-Tq // block) * block
    Tkp = -(-Tk // block) * block
    acc = _acc(q.dtype)
    sq = pl.squeezed
    qspec = pl.BlockSpec((sq, sq, block, Ep), lambda b, h, t: (b, h, t, 0))
    kspec = pl.BlockSpec((sq, sq, Tkp, Ep), lambda b, h, t: (b, h, 0, 0))
    args = [meta, _pad_bhte(q, Tqp, Ep)] + [_pad_bhte(a, Tkp, Ep)
                                            for a in ((k, v, fk, fv) if fading else (k, v))]
    in_specs = [META_SPEC, qspec] + [kspec] * (len(args) - 2)
    packed = docs is not None
    if packed:  # each query tile's document starts, right after meta
        args.insert(1, pad_docs(docs, Tqp))
        in_specs.insert(1, pl.BlockSpec((block,), lambda b, h, t: (t,)))
    S = 0
    if store:
        S, M = spos.shape[1], spos.shape[2]
        Mp = max(16, _pow2(M))
        pad = [(0, 0), (0, 0), (0, 0), (0, Mp - M), (0, Ep - E)]
        args += [jnp.pad(sk, pad), jnp.pad(sv, pad),
                 jnp.pad(spos.astype(jnp.int32), [(0, 0), (0, 0), (0, Mp - M)],
                         constant_values=-1)]  # padded slots are empty
        sspec = pl.BlockSpec((sq, sq, S, Mp, Ep), lambda b, h, t: (b, h, 0, 0, 0))
        in_specs += [sspec, sspec, pl.BlockSpec((sq, S, Mp), lambda b, h, t: (b, 0, 0))]
    out_shape = (jax.ShapeDtypeStruct((B, H, Tqp, Ep), q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tqp), acc))
    lspec = pl.BlockSpec((sq, sq, block), lambda b, h, t: (b, h, t))
    kernel = functools.partial(
        _attn_kernel, W=window, off=Tk - Tq, Tk=Tk, scale=1.0 / math.sqrt(E), fading=fading,
        store=store, C=chunk, S=S, block=block, acc=acc,
        precision=lax.Precision.HIGHEST if acc == jnp.float32 else None, packed=packed)
    aliases = {}
    if poison:
        # a NaN-filled output buffer: any element the kernel fails to write stays NaN
        aliases = {len(args): 0, len(args) + 1: 1}
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        in_specs += [qspec, lspec]
        kernel = functools.partial(_skip_alias, kernel)
    o, lse = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, H, Tqp // block), in_specs=in_specs,
        out_specs=(qspec, lspec), input_output_aliases=aliases, interpret=interpret,
        compiler_params=compiler_params(block, Ep),  # the Triton lowering on GPUs
    )(*args)
    return jnp.swapaxes(o[:, :, :Tq, :E], 1, 2), lse


def _skip_alias(kernel, *refs):
    # the aliased NaN buffers sit just before the outputs; the kernel never reads them
    kernel(*(refs[:-4] + refs[-2:]))


# meta: int32 [2] = (pos, key_start), read by the kernels at run time
META_SPEC = pl.BlockSpec((2,), lambda *_: (0,))
_STATIC = (10, 11, 12, 13, 14)  # window, chunk, interpret, poison, block


@functools.partial(jax.custom_vjp, nondiff_argnums=_STATIC)
def _attention(q, k, v, fk, fv, sk, sv, spos, meta, docs, window, chunk, interpret, poison,
               block):
    return _forward(q, k, v, fk, fv, sk, sv, spos, meta, docs, window, chunk, interpret,
                    poison, block)[0]


def _attention_fwd(q, k, v, fk, fv, sk, sv, spos, meta, docs, window, chunk, interpret, poison,
                   block):
    o, lse = _forward(q, k, v, fk, fv, sk, sv, spos, meta, docs, window, chunk, interpret,
                      poison, block)
    return o, (q, k, v, fk, fv, sk, sv, spos, meta, docs, o, lse)


def _attention_bwd(window, chunk, interpret, poison, block, res, g):
    q, k, v, fk, fv, sk, sv, spos, meta, docs, o, lse = res
    # store positions, meta and document starts are integers: no cotangent
    if sk is None:
        from .windowed_readout_bwd import backward

        return backward(q, k, v, fk, fv, o, lse, g, meta, window, interpret, poison,
                        block, docs) + (None, None, None, None, None)

    def f(q, k, v, fk, fv, sk, sv):
        return windowed_readout_ref(q, k, v, window, fk, fv, sk, sv, spos, chunk, meta[0],
                                   block=block, key_start=meta[1])

    _, vjp = jax.vjp(f, q, k, v, fk, fv, sk, sv)
    return vjp(g) + (None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def windowed_readout(q, k, v, window, fading_k=None, fading_v=None, store_k=None, store_v=None,
                    store_pos=None, chunk=None, pos=0, *, key_start=0, cu_seqlens=None,
                    interpret=False, poison=False, block=BLOCK):
    """One softmax over the raw window, the fading window and the visible store entries.

    q [B, Tq, H, E] at positions pos .. pos + Tq - 1; k, v, fading_k, fading_v [B, Tk, H, E];
    store_k, store_v [B, H, S, M, E] and store_pos [B, S, M] (negative: empty slot), snapshot s
    serving the queries of chunk pos // chunk + s; an entry at position p is visible from t
    when p <= t - W. ``pos`` and ``key_start`` may be 0-d integer arrays (traced inside jit);
    keys before index ``key_start`` (an unfilled cache) are never visible, in any source.
    ``cu_seqlens`` (int32 [N + 1], may be traced; a packed row of batch 1 at positions within
    documents, no cache and no store, as the Triton kernel's): a query sees only keys of its
    own document. Returns o [B, Tq, H, E] in q's dtype. ``interpret`` runs the Pallas
    interpreter (any device); ``poison`` hands the kernel a NaN-filled output buffer (tests);
    ``block`` is the tile size, a power of two (at least 16 when compiled for a GPU).
    """
    check(q, k, v, window, fading_k, fading_v, store_k, store_v, store_pos, chunk, pos,
           key_start)
    if block < 1 or block & (block - 1):
        raise ValueError(f"windowed_readout: block must be a power of two, got {block}")
    docs = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q, k, store_k, pos, key_start)
        docs = doc_starts(jnp.asarray(cu_seqlens), q.shape[1])
    if store_k is None:
        chunk = None
    meta = jnp.stack([jnp.asarray(pos, jnp.int32), jnp.asarray(key_start, jnp.int32)])
    return _attention(q, k, v, fading_k, fading_v, store_k, store_v, store_pos, meta, docs,
                      window, chunk, bool(interpret), bool(poison), int(block))


@functools.partial(jax.jit, static_argnums=(3, 9), static_argnames=("block",))
def windowed_readout_ref(q, k, v, window, fading_k=None, fading_v=None, store_k=None,
                        store_v=None, store_pos=None, chunk=None, pos=0, *, block=BLOCK,
                        key_start=0, cu_seqlens=None):
    """The same function in plain JAX, banded: each tile of ``block`` queries gathers the
    BLOCK + span keys it can see (and each query its snapshot's store entries) and runs one
    masked softmax over them. ``pos``, ``key_start`` and ``cu_seqlens`` (as the kernel's: a
    query sees keys of its own document only) are traced (one compilation)."""
    B, Tq, H, E = q.shape
    Tk = k.shape[1]
    off = Tk - Tq
    acc = _acc(q.dtype)
    span = Tk if window is None else (2 * window if fading_k is not None else window)
    n = -(-Tq // block)
    band = block + span - 1
    # key index of band slot s for query tile t; slots before key 0 or past Tk are masked
    t0 = jnp.arange(n)[:, None] * block
    kidx = t0 + off - span + 1 + jnp.arange(band)[None, :]  # [n, band]
    kok = (kidx >= key_start) & (kidx >= 0) & (kidx < Tk)
    kclip = jnp.clip(kidx, 0, Tk - 1)
    qi = t0 + jnp.arange(block)[None, :]  # [n, block]
    qok = qi < Tq
    qp = jnp.pad(q.astype(acc), [(0, 0), (0, n * block - Tq), (0, 0), (0, 0)])
    qt = qp.reshape(B, n, block, H, E)
    rel = (qi[:, :, None] + off) - kidx[:, None, :]  # [n, block, band]: distance back in time
    live = kok[:, None, :] & qok[:, :, None]
    if cu_seqlens is not None:  # keys before the query's document start are not its own
        st = doc_starts(cu_seqlens, Tq)[jnp.minimum(qi, Tq - 1)]  # [n, block]
        live = live & (kidx[:, None, :] >= st[:, :, None])
    W = Tk if window is None else window
    sources = [(k, v, (rel >= 0) & (rel < W) & live)]
    if fading_k is not None:
        sources.append((fading_k, fading_v, (rel >= W) & (rel < 2 * W) & live))
    scale = 1.0 / math.sqrt(E)
    scores, values = [], []
    for kk, vv, mask in sources:
        kb = jnp.take(kk.astype(acc), kclip, axis=1)  # [B, n, band, H, E]
        vb = jnp.take(vv.astype(acc), kclip, axis=1)
        s = jnp.einsum("bnqhe,bnkhe->bnhqk", qt, kb) * scale
        scores.append(jnp.where(mask[None, :, None], s, -jnp.inf))
        values.append(vb)
    nb = sum(s.shape[-1] for s in scores)
    if store_k is not None:
        # each query's snapshot: [n, block] indices into S, its entries [B, H, n, block, M, E]
        snap = jnp.clip((pos + qi) // chunk - pos // chunk, 0, store_pos.shape[1] - 1)
        sk = store_k.astype(acc)[:, :, snap]
        sv = store_v.astype(acc)[:, :, snap]
        sp = store_pos[:, snap]  # [B, n, block, M]
        ok = (sp >= 0) & (sp <= (pos + qi)[None, :, :, None] - window) & qok[None, :, :, None]
        s = jnp.einsum("bnqhe,bhnqme->bnhqm", qt, sk) * scale
        scores.append(jnp.where(ok[:, :, None], s, -jnp.inf))
    s = jnp.concatenate(scores, axis=-1)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - lax.stop_gradient(m))
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    # A band holds later keys too, whose p is 0, and 0 times a NaN or an infinity is NaN: the
    # products read non-finite values as 0, and the rows that see one are set to NaN.
    vals = jnp.concatenate(values, axis=2)  # [B, n, nb, H, E]
    finite = jnp.isfinite(vals)
    o = jnp.einsum("bnhqk,bnkhe->bnqhe", p[..., :nb], jnp.where(finite, vals, 0.0))
    seen = jnp.concatenate([mask for _, _, mask in sources], axis=-1)  # [n, block, nb]
    key_bad = ~jnp.all(finite, axis=-1)  # [B, n, nb, H]
    hit = jnp.any(seen[None, :, :, :, None] & key_bad[:, :, None], axis=3)  # [B, n, block, H]
    if store_k is not None:
        s_finite = jnp.isfinite(sv)
        o = o + jnp.einsum("bnhqm,bhnqme->bnqhe", p[..., nb:], jnp.where(s_finite, sv, 0.0))
        s_bad = ok[:, None] & ~jnp.all(s_finite, axis=-1)  # [B, H, n, block, M]
        hit = hit | jnp.moveaxis(jnp.any(s_bad, axis=-1), 1, -1)
    o = jnp.where(hit[..., None], jnp.nan, o)
    return o.reshape(B, n * block, H, E)[:, :Tq].astype(q.dtype)
