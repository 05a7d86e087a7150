"""Windowed-attention layers: transformer, bmojo_f and bmojo (DESIGN 2.3, 2.4).

For a query at position t one softmax runs over the raw window (t - W, t], the fading window
(t - 2W, t - W] and the visible store (entries with position <= t - W in the store after the
chunk before t's). Each source is a softmax partial; ``combine`` makes them one softmax.

State arrays (reference names and layouts): ``k``, ``v`` [B, H, W, E] ring (slot p % W), or
with W = None a cache of ``max_len`` slots (slot p); ``fk``, ``fv`` [B, H, 2W, E] ring;
``conv``, ``ssm`` of the Mamba block; bmojo: ``s_last`` [B, D], ``cand_*`` (running best
``select`` of the current chunk) and ``store_*`` (``capacity`` entries).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import dispatch, mamba, store
from ._base import POS_DTYPE, combine, linear, partial, rope
from .banded import banded_partial, dense_partial, refill_ring, ring_positions, unroll_ring


def _flags(spec):
    return bool(getattr(spec, "fading", False)), getattr(spec, "store", None)


def sub(p: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def init_arrays(spec, batch: int, dtype, max_len: int) -> dict:
    H, E, W = spec.n_heads, spec.head_dim, spec.window
    raw = max_len if W is None else W
    st = {"k": jnp.zeros((batch, H, raw, E), dtype)}
    st["v"] = st["k"]
    fading, sts = _flags(spec)
    if fading:
        st["fk"] = jnp.zeros((batch, H, 2 * W, E), dtype)
        st["fv"] = st["fk"]
        st.update(mamba.init_arrays(spec.fading_block, batch, dtype))
    if sts is not None:
        st["s_last"] = jnp.zeros((batch, spec.d_model), dtype)
        for prefix, n in (("cand_", sts.select), ("store_", sts.capacity)):
            for f, a in store.empty(batch, H, n, E, dtype).items():
                st[prefix + f] = a
    return st


def _qkv(spec, wq, wk, wv, x, qpos):
    """x: [B, T, D] -> q, k, v [B, H, T, E]; q and k rotated at ``qpos`` when rope."""
    B, T, _ = x.shape
    H, E = spec.n_heads, spec.head_dim

    def proj(w, rotate):
        y = linear(x, w).reshape(B, T, H, E)
        if rotate and spec.positions == "rope":
            y = rope(y, qpos)
        return jnp.swapaxes(y, 1, 2)

    return (None if wq is None else proj(wq, True)), proj(wk, True), proj(wv, False)


def _fading_weights(spec, p):
    if spec.tie_fading:
        return p["k_proj.weight"], p["v_proj.weight"]
    return p["k_fading_proj.weight"], p["v_fading_proj.weight"]


def _out(spec, p, o):
    B, H, T, E = o.shape
    return linear(jnp.swapaxes(o, 1, 2).reshape(B, T, H * E), p["o_proj.weight"])


def forward(spec, p, x, st, pos):
    """Parallel form. x: [B, T, D] at positions pos .. pos + T - 1 -> (y, arrays, aux)."""
    B, T, _ = x.shape
    W = spec.window
    fading, sts = _flags(spec)
    scale = 1.0 / math.sqrt(spec.head_dim)
    qpos = pos + jnp.arange(T)
    q, k, v = _qkv(spec, p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"], x, qpos)
    new, parts = {}, []
    kernel = W is not None and dispatch.use_kernels(q)  # all sources in one kernel call
    if W is None:
        slot = pos + jnp.arange(T)
        new["k"] = st["k"].at[:, :, slot].set(k, mode="drop")
        new["v"] = st["v"].at[:, :, slot].set(v, mode="drop")
        mask = jnp.arange(st["k"].shape[2])[None, :] <= qpos[:, None]
        parts.append(dense_partial(q, new["k"], new["v"], mask[None, None], scale))
    else:
        kx = jnp.concatenate([unroll_ring(st["k"], pos, W), k], axis=2)
        vx = jnp.concatenate([unroll_ring(st["v"], pos, W), v], axis=2)
        valid = (pos - W + jnp.arange(W + T)) >= 0
        if not kernel:
            parts.append(banded_partial(q, kx, vx, jnp.broadcast_to(valid, (B, W + T)), W,
                                        scale))
        new["k"] = refill_ring(kx, pos - W, pos + T, W)
        new["v"] = refill_ring(vx, pos - W, pos + T, W)

    s = None
    if fading:
        s, mst = mamba.forward(spec.fading_block, sub(p, "fading."), x,
                               {"conv": st["conv"], "ssm": st["ssm"]})
        new.update(mst)
        wk, wv = _fading_weights(spec, p)
        _, fk, fv = _qkv(spec, None, wk, wv, s, qpos)
        fkx = jnp.concatenate([unroll_ring(st["fk"], pos, 2 * W), fk], axis=2)
        fvx = jnp.concatenate([unroll_ring(st["fv"], pos, 2 * W), fv], axis=2)
        valid = (pos - 2 * W + jnp.arange(2 * W + T)) >= 0
        if not kernel:
            parts.append(banded_partial(q, fkx, fvx, jnp.broadcast_to(valid, (B, 2 * W + T)),
                                        W, scale))
        new["fk"] = refill_ring(fkx, pos - 2 * W, pos + T, 2 * W)
        new["fv"] = refill_ring(fvx, pos - 2 * W, pos + T, 2 * W)

    aux, seen = None, None
    if sts is not None:
        if fading:
            s_prev = jnp.concatenate([st["s_last"][:, None, :], s[:, :T - 1]], axis=1)
            scores = store.innovation_scores(x, s_prev, p["pred_proj.weight"])
        else:
            scores = store.innovation_scores(x, None, None)
        aux = jnp.mean(scores)
        snap, layout, cand, kept = store.parallel(k, v, scores, st, pos, sts.chunk, sts.select,
                                                  sts.capacity)
        if sts.capacity > 0 and kernel:
            seen = snap
        elif sts.capacity > 0:
            parts.append(_store_partial(q, snap, layout, W, sts.chunk, scale))
        new["s_last"] = s[:, T - 1] if fading else st["s_last"]
        new.update({"cand_" + f: a for f, a in cand.items()})
        new.update({"store_" + f: a for f, a in kept.items()})

    if kernel:
        o = dispatch.windowed_readout(q, pos, W, (kx, vx), (fkx, fvx) if fading else None, seen,
                                      None if sts is None else sts.chunk)
    else:
        o = combine(parts)
    return _out(spec, p, o), new, aux


def _store_partial(q, snap, layout, W: int, C: int, scale: float):
    """Queries laid out on chunks, each chunk against its own store snapshot."""
    B, H, T, E = q.shape
    tok, _, fpos, off, nc = layout
    qc = jnp.take(q, tok, axis=2).reshape(B, H, nc, C, E)
    qpos = fpos.reshape(nc, C)
    spos = snap["pos"]  # [B, nc, M]
    mask = (spos[:, :, None, :] >= 0) & (spos[:, :, None, :] <= qpos[None, :, :, None] - W)
    scores = jnp.einsum("bhnce,bhnme->bhncm", qc, snap["k"]) * scale
    m, l, o = partial(scores, mask[:, None], snap["v"])
    back = off + jnp.arange(T)  # slot of token i in the chunk layout
    return (jnp.take(m.reshape(B, H, nc * C), back, axis=2),
            jnp.take(l.reshape(B, H, nc * C), back, axis=2),
            jnp.take(o.reshape(B, H, nc * C, E), back, axis=2))


def step(spec, p, x_t, st, pos):
    """Streaming form. x_t: [B, D] at position pos -> (y_t, arrays, aux)."""
    B, D = x_t.shape
    W = spec.window
    fading, sts = _flags(spec)
    scale = 1.0 / math.sqrt(spec.head_dim)
    x = x_t[:, None, :]
    qpos = pos + jnp.arange(1)
    q, k, v = _qkv(spec, p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"], x, qpos)
    new, parts = {}, []
    S = st["k"].shape[2]
    slot = pos if W is None else jnp.remainder(pos, W)
    write = (jnp.arange(S) == slot)[None, None, :, None]
    new["k"] = jnp.where(write, k, st["k"])
    new["v"] = jnp.where(write, v, st["v"])
    if W is None:
        kpos = jnp.arange(S)
        mask = kpos <= pos
    else:
        kpos = ring_positions(pos + 1, W)
        mask = (kpos >= 0) & (kpos > pos - W)
    parts.append(dense_partial(q, new["k"], new["v"], mask[None, None, None], scale))

    s_t = None
    if fading:
        s_t, mst = mamba.step(spec.fading_block, sub(p, "fading."), x_t,
                              {"conv": st["conv"], "ssm": st["ssm"]})
        new.update(mst)
        wk, wv = _fading_weights(spec, p)
        _, fk, fv = _qkv(spec, None, wk, wv, s_t[:, None, :], qpos)
        fwrite = (jnp.arange(2 * W) == jnp.remainder(pos, 2 * W))[None, None, :, None]
        new["fk"] = jnp.where(fwrite, fk, st["fk"])
        new["fv"] = jnp.where(fwrite, fv, st["fv"])
        fpos = ring_positions(pos + 1, 2 * W)
        fmask = (fpos >= 0) & (fpos <= pos - W) & (fpos > pos - 2 * W)
        parts.append(dense_partial(q, new["fk"], new["fv"], fmask[None, None, None], scale))

    aux = None
    if sts is not None:
        kept = {f: st["store_" + f] for f in store.FIELDS}
        if sts.capacity > 0:
            visible = (kept["pos"] >= 0) & (kept["pos"] <= pos - W)  # [B, M]
            parts.append(dense_partial(q, kept["k"], kept["v"], visible[:, None, None, :], scale))
        if fading:
            score = store.innovation_scores(x, st["s_last"][:, None, :], p["pred_proj.weight"])
        else:
            score = store.innovation_scores(x, None, None)
        aux = jnp.mean(score)
        tok = {"k": k, "v": v, "score": jax.lax.stop_gradient(score),
               "pos": jnp.full((B, 1), pos, POS_DTYPE)}
        cand = store.merge({f: st["cand_" + f] for f in store.FIELDS}, tok, sts.select)
        at_end = jnp.remainder(pos + 1, sts.chunk) == 0
        flushed = store.merge(kept, cand, sts.capacity) if sts.capacity > 0 else kept
        kept = store.select(at_end, flushed, kept)
        cand = store.select(at_end, store.empty(B, spec.n_heads, sts.select, spec.head_dim,
                                                x_t.dtype), cand)
        new["s_last"] = s_t if fading else st["s_last"]
        new.update({"cand_" + f: a for f, a in cand.items()})
        new.update({"store_" + f: a for f, a in kept.items()})

    return _out(spec, p, combine(parts))[:, 0], new, aux
