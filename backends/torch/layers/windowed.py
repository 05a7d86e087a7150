"""The windowed layers (section 3: transformer, bmojo_f, bmojo): rotated q/k/v projections, the
windowed readout (2.3) over the raw window, the fading window (keys and values projected from a
Mamba block's output s) and the eidetic store (2.4). States in the reference's layout: rings
``k``/``v`` of the n_kv_heads key/value heads (a growing cache without a window), ``fk``/``fv``
and the fading block's ``conv``/``ssm``, ``s_last``, the candidates ``cand_*`` and the store
``store_*``; plus ``pos``.
"""

from __future__ import annotations

import torch
from memcore.spec.constants import ROPE_BASE

from .. import eidetic_store
from ..numerics import NEG_INF, default_scale, linear
from ..params import sub
from ..rings import append_in_place, ring_positions, ring_to_seq, ring_write, seq_to_ring
from ..rotary import rope, step_tables
from ..windowed_readout import causal_full, readout
from . import mamba


def init_state(spec, batch: int, *, dtype=torch.float32, device=None) -> dict:
    H, E, W = spec.n_heads, spec.head_dim, spec.window
    rd = spec.readout

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device)

    raw, Hkv = (0 if W is None else W), _kv_heads(spec)
    state = {"pos": 0, "k": zeros(batch, Hkv, raw, E), "v": zeros(batch, Hkv, raw, E)}
    if rd.fading:
        state["fk"], state["fv"] = zeros(batch, H, 2 * W, E), zeros(batch, H, 2 * W, E)
        fb = mamba.init_state(spec.fading_block, batch, dtype=dtype, device=device)
        state.update(conv=fb["conv"], ssm=fb["ssm"])
    st = rd.store
    if st is not None:
        state["s_last"] = zeros(batch, spec.d_model)
        for prefix, n in (("cand_", st.select), ("store_", st.capacity)):
            for f, a in eidetic_store.empty(batch, H, n, E, dtype, device).items():
                state[prefix + f] = a
    return state


def _kv_heads(spec) -> int:
    return getattr(spec, "n_kv_heads", spec.n_heads)


def _shared(spec, a):
    """Keys or values [B, Hkv, S, E] with each head repeated for the g = H / Hkv query heads
    it serves (grouped-query attention, as transformers' repeat_kv) -> [B, H, S, E]."""
    g = spec.n_heads // _kv_heads(spec)
    return a if g == 1 else a.repeat_interleave(g, dim=1)


def _heads(spec, x, weight, pos, rotate):
    """x [B, T, D] -> [B, heads, T, E], heads = the weight's rows / E (q: H, k and v: Hkv)."""
    B, T, _ = x.shape
    y = linear(x, weight).reshape(B, T, weight.shape[0] // spec.head_dim, spec.head_dim)
    if rotate and spec.positions == "rope":
        y = rope(y, pos, base=getattr(spec, "rope_theta", ROPE_BASE))
    return y.transpose(1, 2)


def _fading_weights(spec, p):
    if spec.tie_fading:
        return p["k_proj.weight"], p["v_proj.weight"]
    return p["k_fading_proj.weight"], p["v_fading_proj.weight"]


def _merge_heads(spec, p, o):
    B, H, T, E = o.shape
    return linear(o.transpose(1, 2).reshape(B, T, H * E), p["o_proj.weight"])


def _entries(state, prefix):
    return {f: state[prefix + f] for f in eidetic_store.FIELDS}


def _fading_state(state):
    return {"pos": state["pos"], "conv": state["conv"], "ssm": state["ssm"]}


def forward(spec, p, x, state, bounds=None):
    """x [B, T, D] in the accumulation dtype -> (y, state, aux). ``bounds``: a packed row's
    checked cu_seqlens (``packed.windowed_forward``)."""
    if bounds is not None:
        from .packed import windowed_forward

        return windowed_forward(spec, p, x, state, bounds)
    B, T, _ = x.shape
    W, pos = spec.window, state["pos"]
    rd = spec.readout
    q = _heads(spec, x, p["q_proj.weight"], pos, True)
    k = _heads(spec, x, p["k_proj.weight"], pos, True)
    v = _heads(spec, x, p["v_proj.weight"], pos, False)
    new = {"pos": pos + T}
    if W is None:  # full causal attention (no fading or store without a window)
        o, new["k"], new["v"] = causal_full(q, *(_shared(spec, a) for a in (
            state["k"], state["v"], k, v)), pos)
        if _kv_heads(spec) != spec.n_heads:  # the cache keeps the key/value heads only
            new["k"], new["v"] = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], 2)
        return _merge_heads(spec, p, o), new, None
    rk = torch.cat([ring_to_seq(state["k"], pos), k], dim=2)  # positions pos-W ..
    rv = torch.cat([ring_to_seq(state["v"], pos), v], dim=2)
    new["k"] = seq_to_ring(rk[:, :, -W:], pos + T)
    new["v"] = seq_to_ring(rv[:, :, -W:], pos + T)
    s = fading = None
    if rd.fading:
        s, mstate, _ = mamba.forward(spec.fading_block, sub(p, "fading."), x,
                                     _fading_state(state))
        new.update(conv=mstate["conv"], ssm=mstate["ssm"])
        wk, wv = _fading_weights(spec, p)
        fk = _heads(spec, s, wk, pos, True)
        fv = _heads(spec, s, wv, pos, False)
        ek = torch.cat([ring_to_seq(state["fk"], pos), fk], dim=2)  # positions pos-2W ..
        ev = torch.cat([ring_to_seq(state["fv"], pos), fv], dim=2)
        fading = (ek, ev)
        new["fk"] = seq_to_ring(ek[:, :, -2 * W:], pos + T)
        new["fv"] = seq_to_ring(ev[:, :, -2 * W:], pos + T)
    aux = store = None
    if rd.store is not None:
        store, aux, st_state = _store_forward(rd.store, p, x, s, k, v, state)
        new.update(st_state)
    o = readout(q, pos, W, (_shared(spec, rk), _shared(spec, rv)), fading, store)
    return _merge_heads(spec, p, o), new, aux


def _store_forward(st, p, x, s, k, v, state):
    """((snapshots, chunk, first chunk, front padding), aux, new store state)."""
    B, T, _ = x.shape
    pos = state["pos"]
    if s is not None:
        s_prev = torch.cat([state["s_last"][:, None, :], s[:, :T - 1]], dim=1)
        scores = eidetic_store.innovation_scores(x, s_prev, p["pred_proj.weight"])
    else:
        scores = eidetic_store.innovation_scores(x, None, None)
    qpos = torch.arange(pos, pos + T, device=x.device)
    toks = {"k": k, "v": v, "score": scores, "pos": qpos[None, :].expand(B, T)}
    snap, c0, front, cand, kept = eidetic_store.select(
        toks, _entries(state, "cand_"), _entries(state, "store_"), pos, st.chunk, st.select,
        st.capacity)
    new = {"s_last": s[:, T - 1] if s is not None else state["s_last"]}
    new.update({"cand_" + f: a for f, a in cand.items()})
    new.update({"store_" + f: a for f, a in kept.items()})
    return (snap, st.chunk, c0, front), scores.mean(), new


def _step_heads(spec, x_t, weight, tables):
    """One token's projection as heads [B, heads, 1, E] (heads = the weight's rows / E),
    rotated with ``tables`` if given."""
    y = linear(x_t, weight).reshape(x_t.shape[0], 1, weight.shape[0] // spec.head_dim,
                                    spec.head_dim)
    if tables is not None:
        y = rope(y, 0, tables)
    return y.transpose(1, 2)


def _step_readout(spec, q, keys, vals, masks, reads):
    """One softmax over the sources' keys for the query q [B, H, 1, E] (a mask of None: every
    key of that source is visible). Scores are joined, values are read source by source:
    the keys and values are never copied into one buffer. ``reads``: per source, the slot
    ranges whose values are read (None: every slot). A masked slot's weight is 0, and
    0 * NaN = NaN, so a slot that may hold a non-finite value the query must not see is
    left out of the product (DESIGN 6): the fading ring's newest W slots. The rest are exact
    as they are: a ring's empty slots hold zeros, and a store entry the query does not see
    yet sits in the raw window too, with the same value, which the query does see (a
    non-finite one makes the row NaN either way)."""
    B, H = q.shape[:2]
    sc = torch.cat([q @ kk.transpose(-1, -2) for kk in keys], dim=-1)
    sc = sc * default_scale(spec.head_dim)
    if any(m is not None for m in masks):
        ones = torch.ones((), dtype=torch.bool, device=q.device)
        mask = torch.cat([(ones if m is None else m).expand(B, H, 1, kk.shape[2])
                          for m, kk in zip(masks, keys, strict=True)], dim=-1)
        sc = sc.masked_fill(~mask, NEG_INF)
    # Finite: the newest raw key is always visible (where its score is not finite, nor is
    # its value, a projection of the same non-finite token, so the row is NaN either way).
    m = sc.amax(-1, keepdim=True).detach()
    w = torch.exp(sc - m)
    acc, start = None, 0
    for vv, ranges in zip(vals, reads, strict=True):
        for a, b in [(0, vv.shape[2])] if ranges is None else ranges:
            part = w[..., start + a:start + b] @ vv[:, :, a:b]
            acc = part if acc is None else acc + part
        start += vv.shape[2]
    return acc / w.sum(-1, keepdim=True)


def _fading_reads(pos: int, W: int):
    """Slot ranges of the fading ring (2W slots, position p in slot p % 2W) that a query at
    pos sees: positions max(0, pos - 2W + 1) .. pos - W, at most two runs of slots."""
    p0, p1 = max(pos - 2 * W + 1, 0), pos - W
    if p1 < p0:
        return []
    s0, n = p0 % (2 * W), p1 - p0 + 1
    if s0 + n <= 2 * W:
        return [(s0, s0 + n)]
    return [(s0, 2 * W), (0, s0 + n - 2 * W)]


def step(spec, p, x_t, state, *, inplace: bool = False):
    """One token. The readout sees the store as it was before this token; the store is
    updated after it. With ``inplace`` every array (rings, Mamba state, ``s_last``, the
    candidates and the store) is written into ``state``'s own tensors."""
    B, _ = x_t.shape
    W, pos = spec.window, state["pos"]
    rd = spec.readout
    st = rd.store
    tables = (step_tables(pos, spec.head_dim, x_t.dtype, x_t.device,
                          getattr(spec, "rope_theta", ROPE_BASE))
              if spec.positions == "rope" and spec.head_dim > 1 else None)
    q = _step_heads(spec, x_t, p["q_proj.weight"], tables)  # [B, H, 1, E]
    k = _step_heads(spec, x_t, p["k_proj.weight"], tables)
    v = _step_heads(spec, x_t, p["v_proj.weight"], None)
    dev = x_t.device
    new = {"pos": pos + 1}
    keys, vals, masks, reads = [], [], [], []
    if W is None:  # the KV cache grows by design (amortised when in place)
        if inplace:
            new["k"] = append_in_place(state["k"], k[:, :, 0])
            new["v"] = append_in_place(state["v"], v[:, :, 0])
        else:
            new["k"] = torch.cat([state["k"], k], dim=2)
            new["v"] = torch.cat([state["v"], v], dim=2)
        masks.append(None)
    else:
        new["k"] = ring_write(state["k"], k[:, :, 0], pos, inplace)
        new["v"] = ring_write(state["v"], v[:, :, 0], pos, inplace)
        masks.append(None if pos + 1 >= W else
                     (ring_positions(pos + 1, W, dev) >= 0)[None, None, None, :])
    keys.append(_shared(spec, new["k"]))
    vals.append(_shared(spec, new["v"]))
    reads.append(None)
    s_t = None
    if rd.fading:
        s_t, mstate, _ = mamba.step(spec.fading_block, sub(p, "fading."), x_t,
                                    _fading_state(state), inplace=inplace)
        new.update(conv=mstate["conv"], ssm=mstate["ssm"])
        wk, wv = _fading_weights(spec, p)
        fk = _step_heads(spec, s_t, wk, tables)
        fv = _step_heads(spec, s_t, wv, None)
        new["fk"] = ring_write(state["fk"], fk[:, :, 0], pos, inplace)
        new["fv"] = ring_write(state["fv"], fv[:, :, 0], pos, inplace)
        sp = ring_positions(pos + 1, 2 * W, dev)
        keys.append(new["fk"])
        vals.append(new["fv"])
        masks.append(((sp >= 0) & (sp <= pos - W))[None, None, None, :])
        reads.append(_fading_reads(pos, W))
    aux = score = None
    if st is not None:
        kept = _entries(state, "store_")
        keys.append(kept["k"])
        vals.append(kept["v"])
        masks.append(((kept["pos"] >= 0) & (kept["pos"] <= pos - W))[:, None, None, :])
        reads.append(None)
        pred = p["pred_proj.weight"] if rd.fading else None
        score = eidetic_store.innovation_scores(
            x_t[:, None, :], state["s_last"][:, None, :] if rd.fading else None, pred)  # [B, 1]
        aux = score.mean()
    o = _step_readout(spec, q, keys, vals, masks, reads)
    if st is not None:  # after the readout, which sees the store before this token
        tok = {"k": k, "v": v, "score": score,
               "pos": torch.full((B, 1), pos, dtype=torch.int64, device=dev)}
        cand, kept = eidetic_store.step(_entries(state, "cand_"), _entries(state, "store_"),
                                        tok, pos, st.chunk, st.select, st.capacity, inplace)
        s_last = state["s_last"]
        if inplace:
            if s_t is not None:
                s_last.copy_(s_t)
        else:  # a new state shares no tensor with the given one
            s_last = s_last.clone() if s_t is None else s_t
        new["s_last"] = s_last
        new.update({"cand_" + f: a for f, a in cand.items()})
        new.update({"store_" + f: a for f, a in kept.items()})
    return _merge_heads(spec, p, o)[:, 0], new, aux
