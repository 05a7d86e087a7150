"""Windowed-readout layers: transformer, bmojo_f and bmojo (DESIGN 2.3, 2.4).

For a query at position t one softmax runs over the raw window (t - W, t], the fading window
(t - 2W, t - W] and the visible store (entries with position <= t - W in the store after the
chunk before t's), as read from ``spec.readout``.

State (reference names and layouts): ``k``, ``v`` [B, Hkv, W, E] ring (slot p % W; Hkv =
n_kv_heads, repeated to the H query heads only for the readout), or with W = None a growing
cache (slot p); ``fk``, ``fv`` [B, H, 2W, E] ring; ``conv``, ``ssm`` of the
Mamba block; bmojo: ``s_last`` [B, D], ``cand_*`` (running best ``select`` of the current
chunk) and ``store_*`` (``capacity`` entries); ``pos``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from memcore.spec.constants import ROPE_BASE

from .. import eidetic_store as store
from ..banded import dense_partial
from ..numerics import POS_DTYPE, combine, linear
from ..rings import cache_write, ring_positions, ring_to_seq, ring_write, seq_to_ring
from ..rotary import rope
from ..windowed_readout import readout
from . import mamba, sub


def init_state(spec, batch: int, dtype, max_len: int = 0) -> dict:
    r = spec.readout
    H, E, W = r.n_heads, r.head_dim, r.window
    raw = max_len if W is None else W
    st = {"k": jnp.zeros((batch, _kv_heads(spec), raw, E), dtype)}
    st["v"] = st["k"]
    if r.fading:
        st["fk"] = jnp.zeros((batch, H, 2 * W, E), dtype)
        st["fv"] = st["fk"]
        st.update(mamba.init_state(spec.fading_block, batch, dtype))
    if r.store is not None:
        st["s_last"] = jnp.zeros((batch, spec.d_model), dtype)
        for prefix, n in (("cand_", r.store.select), ("store_", r.store.capacity)):
            for f, a in store.empty(batch, H, n, E, dtype).items():
                st[prefix + f] = a
    st["pos"] = jnp.zeros((), POS_DTYPE)
    return st


def _kv_heads(spec) -> int:
    return getattr(spec, "n_kv_heads", spec.readout.n_heads)


def _shared(spec, a):
    """Keys or values [B, Hkv, S, E] with each head repeated for the g = H / Hkv query heads
    it serves (grouped-query attention, as transformers' repeat_kv) -> [B, H, S, E]."""
    g = spec.readout.n_heads // _kv_heads(spec)
    return a if g == 1 else jnp.repeat(a, g, axis=1)


def _qkv(spec, wq, wk, wv, x, qpos):
    """x: [B, T, D] -> q [B, H, T, E], k, v [B, Hkv, T, E] (heads: the weight's rows / E); q
    and k rotated at ``qpos`` when rope."""
    B, T, _ = x.shape
    r = spec.readout
    E = r.head_dim

    def proj(w, rotate):
        y = linear(x, w).reshape(B, T, w.shape[0] // E, E)
        if rotate and r.positions == "rope":
            y = rope(y, qpos, getattr(spec, "rope_theta", ROPE_BASE))
        return jnp.swapaxes(y, 1, 2)

    return (None if wq is None else proj(wq, True)), proj(wk, True), proj(wv, False)


def _fading_weights(spec, p):
    if spec.tie_fading:
        return p["k_proj.weight"], p["v_proj.weight"]
    return p["k_fading_proj.weight"], p["v_fading_proj.weight"]


def _out(p, o):
    B, H, T, E = o.shape
    return linear(jnp.swapaxes(o, 1, 2).reshape(B, T, H * E), p["o_proj.weight"])


def _mamba_state(st):
    return {"conv": st["conv"], "ssm": st["ssm"], "pos": st["pos"]}


def _scores(x, s_prev, p):
    """Innovation scores of x against the fading memory's previous output (none: s = 0)."""
    if s_prev is None:
        return store.innovation_scores(x, None, None)
    return store.innovation_scores(x, s_prev, p["pred_proj.weight"])


def forward(spec, p, x, st, *, implementation="auto", cu_seqlens=None):
    """Parallel form. x: [B, T, D] at positions pos .. pos + T - 1 -> (y, state, aux).
    ``cu_seqlens``: a packed row's checked boundaries (``packed.windowed_forward``)."""
    if cu_seqlens is not None:
        from .packed import windowed_forward

        return windowed_forward(spec, p, x, st, cu_seqlens, implementation)
    T = x.shape[1]
    r = spec.readout
    W, sts, pos = r.window, r.store, st["pos"]
    qpos = pos + jnp.arange(T)
    q, k, v = _qkv(spec, p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"], x, qpos)
    new = {"pos": pos + T}
    if W is None:
        new["k"] = cache_write(st["k"], k, pos)
        new["v"] = cache_write(st["v"], v, pos)
        mask = jnp.arange(st["k"].shape[2])[None, :] <= qpos[:, None]
        scale = 1.0 / math.sqrt(r.head_dim)
        o = combine([dense_partial(q, _shared(spec, new["k"]), _shared(spec, new["v"]),
                                   mask[None, None], scale)])
        return _out(p, o), new, None

    raw = (jnp.concatenate([ring_to_seq(st["k"], pos, W), k], axis=2),
           jnp.concatenate([ring_to_seq(st["v"], pos, W), v], axis=2))
    new["k"], new["v"] = (seq_to_ring(a, pos - W, pos + T, W) for a in raw)
    s, fading = None, None
    if r.fading:
        s, mst, _ = mamba.forward(spec.fading_block, sub(p, "fading."), x, _mamba_state(st),
                                  implementation=implementation)
        new.update(conv=mst["conv"], ssm=mst["ssm"])
        _, fk, fv = _qkv(spec, None, *_fading_weights(spec, p), s, qpos)
        fading = (jnp.concatenate([ring_to_seq(st["fk"], pos, 2 * W), fk], axis=2),
                  jnp.concatenate([ring_to_seq(st["fv"], pos, 2 * W), fv], axis=2))
        new["fk"], new["fv"] = (seq_to_ring(a, pos - 2 * W, pos + T, 2 * W) for a in fading)

    aux, seen = None, None
    if sts is not None:
        s_prev = None if s is None else jnp.concatenate([st["s_last"][:, None, :], s[:, :T - 1]],
                                                        axis=1)
        scores = _scores(x, s_prev, p)
        aux = jnp.mean(scores)
        snap, layout, cand, kept = store.parallel(k, v, scores, st, pos, sts.chunk, sts.select,
                                                  sts.capacity)
        if sts.capacity > 0:
            seen = (snap, layout, sts.chunk)
        new["s_last"] = s[:, T - 1] if s is not None else st["s_last"]
        new.update({"cand_" + f: a for f, a in cand.items()})
        new.update({"store_" + f: a for f, a in kept.items()})
    o = readout(q, pos, W, tuple(_shared(spec, a) for a in raw), fading, seen,
                implementation=implementation)
    return _out(p, o), new, aux


def step(spec, p, x_t, st):
    """Streaming form. x_t: [B, D] at position pos -> (y_t, state, aux)."""
    B = x_t.shape[0]
    r = spec.readout
    W, sts, pos = r.window, r.store, st["pos"]
    scale = 1.0 / math.sqrt(r.head_dim)
    x = x_t[:, None, :]
    qpos = pos + jnp.arange(1)
    q, k, v = _qkv(spec, p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"], x, qpos)
    new, parts = {"pos": pos + 1}, []
    slot = pos if W is None else jnp.remainder(pos, W)
    new["k"] = ring_write(st["k"], k, slot)
    new["v"] = ring_write(st["v"], v, slot)
    if W is None:
        mask = jnp.arange(st["k"].shape[2]) <= pos
    else:
        kpos = ring_positions(pos + 1, W)
        mask = (kpos >= 0) & (kpos > pos - W)
    parts.append(dense_partial(q, _shared(spec, new["k"]), _shared(spec, new["v"]),
                               mask[None, None, None], scale))

    s_t = None
    if r.fading:
        s_t, mst, _ = mamba.step(spec.fading_block, sub(p, "fading."), x_t, _mamba_state(st))
        new.update(conv=mst["conv"], ssm=mst["ssm"])
        _, fk, fv = _qkv(spec, None, *_fading_weights(spec, p), s_t[:, None, :], qpos)
        new["fk"] = ring_write(st["fk"], fk, jnp.remainder(pos, 2 * W))
        new["fv"] = ring_write(st["fv"], fv, jnp.remainder(pos, 2 * W))
        fpos = ring_positions(pos + 1, 2 * W)
        fmask = (fpos >= 0) & (fpos <= pos - W) & (fpos > pos - 2 * W)
        parts.append(dense_partial(q, new["fk"], new["fv"], fmask[None, None, None], scale))

    aux = None
    if sts is not None:
        kept = {f: st["store_" + f] for f in store.FIELDS}
        if sts.capacity > 0:
            visible = (kept["pos"] >= 0) & (kept["pos"] <= pos - W)  # [B, M]
            parts.append(dense_partial(q, kept["k"], kept["v"], visible[:, None, None, :], scale))
        score = _scores(x, None if s_t is None else st["s_last"][:, None, :], p)
        aux = jnp.mean(score)
        tok = {"k": k, "v": v, "score": jax.lax.stop_gradient(score),
               "pos": jnp.full((B, 1), pos, POS_DTYPE)}
        cand = store.merge({f: st["cand_" + f] for f in store.FIELDS}, tok, sts.select)
        at_end = jnp.remainder(pos + 1, sts.chunk) == 0
        flushed = store.merge(kept, cand, sts.capacity) if sts.capacity > 0 else kept
        kept = store.select(at_end, flushed, kept)
        blank = store.empty(B, r.n_heads, sts.select, r.head_dim, x_t.dtype)
        cand = store.select(at_end, blank, cand)
        new["s_last"] = s_t if s_t is not None else st["s_last"]
        new.update({"cand_" + f: a for f, a in cand.items()})
        new.update({"store_" + f: a for f, a in kept.items()})

    return _out(p, combine(parts))[:, 0], new, aux
