"""Backward of the windowed-readout kernel (raw and fading sources) in Pallas.

FlashAttention-2 style: probabilities are recomputed from the forward's row log-sum-exp, with
delta_i = sum_e do_ie o_ie. One kernel gives dq, walking the same key tiles as the forward; one
kernel per source gives that source's dk and dv, walking only the query tiles that can see its
key tile (raw: queries i with j - off <= i < j - off + W; fading: the same shifted by W).
Accumulation is float32 (float64 for float64 inputs). With a store the forward's backward uses
the plain-JAX recomputation instead (see ``windowed_readout``). In a packed row both kernels
take the queries' document starts and mask keys before them, as the forward does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .windowed_readout import (
    META_SPEC,
    _acc,
    _pad_bhte,
    _pow2,
    compiler_params,
    pad_docs,
    row_starts,
)


def _dot(a, b, acc, precision):
    return jnp.dot(a, b, precision=precision, preferred_element_type=acc)


def _dq_kernel(*refs, W, off, Tq, Tk, scale, fading, block, acc, precision, packed=False):
    refs = list(refs)
    meta_ref = refs.pop(0)
    docs_ref = refs.pop(0) if packed else None
    q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref = refs[:6]
    fk_ref, fv_ref = refs[6:8] if fading else (None, None)
    dq_ref = refs[-1]
    kst, kstart = row_starts(meta_ref[1], None if docs_ref is None else docs_ref[...])
    i0 = pl.program_id(2) * block
    q = q_ref[...].astype(acc)
    do = do_ref[...].astype(acc)
    lse = lse_ref[...][:, None]
    dl = dl_ref[...][:, None]
    i = i0 + lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    jj = lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def visit(kr, vr, lo_off, hi_off, dq):
        lo = kstart if hi_off is None else jnp.maximum(i0 + off - hi_off + 1, kstart)
        first = lo // block
        last = jnp.minimum(i0 + block - 1 + off - lo_off, Tk - 1) // block

        def tile(t, dq):
            j = t * block + jj
            kt = kr[pl.ds(t * block, block), :].astype(acc)
            vt = vr[pl.ds(t * block, block), :].astype(acc)
            vis = (j <= i + off - lo_off) & (j < Tk) & (i < Tq) & (j >= kst)
            if hi_off is not None:
                vis = vis & (j > i + off - hi_off)
            s = _dot(q, kt.T, acc, precision) * scale
            p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse, 0.0)), 0.0)
            ds = p * (_dot(do, vt.T, acc, precision) - dl)
            return dq + _dot(ds, kt, acc, precision) * scale

        return lax.fori_loop(first, last + 1, tile, dq)

    dq = visit(k_ref, v_ref, 0, W, jnp.zeros(q.shape, acc))
    if fading:
        dq = visit(fk_ref, fv_ref, W, 2 * W, dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(*refs, lo_off, hi_off, off, Tq, Tk, scale, block, acc, precision,
                 packed=False):
    """Keys j of this tile are seen by queries i with lo_off <= i + off - j < hi_off, unless
    they sit before the first key that exists (``key_start``) or, in a packed row, before
    the query's document start."""
    refs = list(refs)
    meta_ref = refs.pop(0)
    docs_ref = refs.pop(0) if packed else None
    q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref, dk_ref, dv_ref = refs
    kstart = meta_ref[1]
    j0 = pl.program_id(2) * block
    k = k_ref[...].astype(acc)  # [BK, E]
    v = v_ref[...].astype(acc)
    j = j0 + lax.broadcasted_iota(jnp.int32, (1, block), 1)
    ii = lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    first = jnp.maximum(j0 - off + lo_off, 0) // block
    last_q = Tq - 1 if hi_off is None else jnp.minimum(j0 + block - 1 - off + hi_off - 1,
                                                       Tq - 1)
    last = last_q // block

    def tile(t, carry):
        dk, dv = carry
        i = t * block + ii
        sl = pl.ds(t * block, block)
        q = q_ref[sl, :].astype(acc)
        do = do_ref[sl, :].astype(acc)
        lse = lse_ref[sl][:, None]
        dl = dl_ref[sl][:, None]
        kst, _ = row_starts(kstart, None if docs_ref is None else docs_ref[sl])
        vis = (j <= i + off - lo_off) & (j < Tk) & (i < Tq) & (j >= kst)
        if hi_off is not None:
            vis = vis & (j > i + off - hi_off)
        s = _dot(q, k.T, acc, precision) * scale  # [BQ, BK]
        p = jnp.where(vis, jnp.exp(jnp.where(vis, s - lse, 0.0)), 0.0)
        dv = dv + _dot(p.T, do, acc, precision)
        ds = p * (_dot(do, v.T, acc, precision) - dl)
        return dk + _dot(ds.T, q, acc, precision) * scale, dv

    dk, dv = lax.fori_loop(first, jnp.maximum(last + 1, first), tile,
                           (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc)))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, args, in_specs, out_shape, out_specs, grid, interpret, poison, params):
    aliases = {}
    if poison:
        # NaN-filled output buffers: any element the kernel fails to write stays NaN
        outs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
        specs = out_specs if isinstance(out_specs, tuple) else (out_specs,)
        aliases = {len(args) + n: n for n in range(len(outs))}
        args = list(args) + [jnp.full(o.shape, jnp.nan, o.dtype) for o in outs]
        in_specs = list(in_specs) + list(specs)
        inner, n_out = kernel, len(outs)

        def kernel(*refs):
            inner(*(refs[:-2 * n_out] + refs[-n_out:]))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=params,  # the Triton lowering on GPUs
    )(*args)


def backward(q, k, v, fk, fv, o, lse, do, meta, window, interpret, poison, block, docs=None):
    """Gradients (dq, dk, dv, dfk, dfv) of the attention output o given its cotangent do;
    lse [B, H, Tq padded] comes from the forward kernel, meta (pos, key_start) int32 [2] and
    docs (the queries' document starts int32 [Tq], or None) are the forward's. dfk, dfv are
    None without fading."""
    B, Tq, H, E = q.shape
    Tk = k.shape[1]
    fading = fk is not None
    acc = _acc(q.dtype)
    Ep = max(16, _pow2(E))
    Tqp = lse.shape[2]
    Tkp = -(-Tk // block) * block
    off = Tk - Tq
    scale = 1.0 / math.sqrt(E)
    precision = lax.Precision.HIGHEST if acc == jnp.float32 else None
    delta = jnp.swapaxes(jnp.sum(do.astype(acc) * o.astype(acc), axis=-1), 1, 2)  # [B, H, Tq]
    delta = jnp.pad(delta, [(0, 0), (0, 0), (0, Tqp - Tq)])
    qq, dd = _pad_bhte(q, Tqp, Ep), _pad_bhte(do, Tqp, Ep)
    keys = [_pad_bhte(a, Tkp, Ep) for a in ((k, v, fk, fv) if fading else (k, v))]
    sq = pl.squeezed
    tile_spec = pl.BlockSpec((sq, sq, block, Ep), lambda b, h, t: (b, h, t, 0))
    row_spec = pl.BlockSpec((sq, sq, block), lambda b, h, t: (b, h, t))
    whole_k = pl.BlockSpec((sq, sq, Tkp, Ep), lambda b, h, t: (b, h, 0, 0))
    whole_q = pl.BlockSpec((sq, sq, Tqp, Ep), lambda b, h, t: (b, h, 0, 0))
    whole_r = pl.BlockSpec((sq, sq, Tqp), lambda b, h, t: (b, h, 0))
    packed = docs is not None
    common = dict(off=off, Tq=Tq, Tk=Tk, scale=scale, block=block, acc=acc,
                  precision=precision, packed=packed)
    # meta, then (packed) the document starts: of the query tile for dq, all for dk and dv
    dq_in, kv_in = [meta], [meta]
    dq_specs, kv_specs = [META_SPEC], [META_SPEC]
    if packed:
        pd = pad_docs(docs, Tqp)
        dq_in.append(pd)
        kv_in.append(pd)
        dq_specs.append(pl.BlockSpec((block,), lambda b, h, t: (t,)))
        kv_specs.append(pl.BlockSpec((Tqp,), lambda b, h, t: (0,)))

    dq = _call(functools.partial(_dq_kernel, W=window, fading=fading, **common),
               dq_in + [qq, dd, lse, delta] + keys,
               dq_specs + [tile_spec, tile_spec, row_spec, row_spec] + [whole_k] * len(keys),
               jax.ShapeDtypeStruct(qq.shape, q.dtype), tile_spec,
               (B, H, Tqp // block), interpret, poison, compiler_params(block, Ep))

    def kv_grads(kk, vv, lo_off, hi_off):
        shape = jax.ShapeDtypeStruct(kk.shape, q.dtype)
        dk, dv = _call(functools.partial(_dkdv_kernel, lo_off=lo_off, hi_off=hi_off, **common),
                       kv_in + [qq, dd, lse, delta, kk, vv],
                       kv_specs + [whole_q, whole_q, whole_r, whole_r, tile_spec, tile_spec],
                       (shape, shape), (tile_spec, tile_spec), (B, H, Tkp // block),
                       interpret, poison, compiler_params(block, Ep))
        return tuple(jnp.swapaxes(a[:, :, :Tk, :E], 1, 2) for a in (dk, dv))

    dk, dv = kv_grads(keys[0], keys[1], 0, window)
    dfk = dfv = None
    if fading:
        dfk, dfv = kv_grads(keys[2], keys[3], window, 2 * window)
    return jnp.swapaxes(dq[:, :, :Tq, :E], 1, 2), dk, dv, dfk, dfv


def backward_ref(q, k, v, fk, fv, do, window, block, key_start=0, cu_seqlens=None):
    """The same gradients as the VJP of the plain-JAX ``windowed_readout_ref``."""
    from .windowed_readout import windowed_readout_ref

    args = (q, k, v) if fk is None else (q, k, v, fk, fv)
    _, vjp = jax.vjp(lambda *a: windowed_readout_ref(*a[:3], window, *a[3:], block=block,
                                                    key_start=key_start,
                                                    cu_seqlens=cu_seqlens), *args)
    grads = vjp(do)
    return grads if fk is not None else grads + (None, None)
