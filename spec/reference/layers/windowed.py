"""Windowed layers: transformer, bmojo_f and bmojo share this code (DESIGN 2.3, 2.4).

Sources of the one softmax, for a query at position t (``spec.readout`` says which are present):
  raw     positions (t-W, t]           keys/values from x            (all j <= t if W is None)
  fading  positions (t-2W, t-W]        keys/values from the Mamba block's output s
  store   entries with position <= t-W of the store after the chunk before t's chunk

State: ``k``, ``v`` [B, Hkv, W, E] ring of raw keys (grows as a KV cache when W is None; Hkv =
n_kv_heads, repeated to the H query heads only for the readout);
``fk``, ``fv`` [B, H, 2W, E] ring of fading keys (a fading key is needed from W to 2W-1 steps
after it is made); ``conv``, ``ssm`` of the Mamba block; for bmojo ``s_last`` [B, D] (the last
fading output, for the next prediction), ``cand_*`` (running top ``select`` of the current chunk)
and ``store_*`` (``capacity`` entries).
"""

from __future__ import annotations

from ...constants import ROPE_BASE
from .. import eidetic_store as es
from ..numerics import device, linear, namespace
from ..packed import doc_positions
from ..rings import seq_positions
from ..rotary import rope
from ..windowed_readout import (
    fading_source,
    fading_source_step,
    raw_source,
    raw_source_step,
    readout,
)
from . import mamba


def _sub(p: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def init_state(spec, batch: int, like):
    """The state before any token, in ``like``'s namespace, dtype and device."""
    xp, dev, dtype, ro = namespace(like), device(like), like.dtype, spec.readout
    H, E, W = ro.n_heads, ro.head_dim, ro.window
    raw = 0 if W is None else W
    state = {"pos": 0, "k": xp.zeros((batch, _kv_heads(spec), raw, E), dtype=dtype, device=dev)}
    state["v"] = state["k"]
    if ro.fading:
        state["fk"] = xp.zeros((batch, H, 2 * W, E), dtype=dtype, device=dev)
        state["fv"] = state["fk"]
        block = mamba.init_state(spec.fading_block, batch, like)
        state.update({k: a for k, a in block.items() if k != "pos"})
    st = ro.store
    if st is not None:
        state["s_last"] = xp.zeros((batch, spec.d_model), dtype=dtype, device=dev)
        for prefix, n in (("cand_", st.select), ("store_", st.capacity)):
            for f, a in es.empty(xp, batch, H, n, E, dtype, like).items():
                state[prefix + f] = a
    return state


def _entries(state, prefix):
    return {f: state[prefix + f] for f in es.FIELDS}


def _kv_heads(spec) -> int:
    return getattr(spec, "n_kv_heads", spec.readout.n_heads)


def _theta(spec) -> float:
    return getattr(spec, "rope_theta", ROPE_BASE)


def _shared(xp, spec, src):
    """A source (keys, values, mask) with each key/value head repeated for the g query heads
    it serves (grouped-query attention, transformers' repeat_kv): [B, Hkv, S, E] ->
    [B, Hkv * g, S, E]."""
    g = spec.readout.n_heads // _kv_heads(spec)
    if g == 1:
        return src

    def rep(a):
        B, Hkv, S, E = a.shape
        return xp.reshape(xp.broadcast_to(a[:, :, None], (B, Hkv, g, S, E)), (B, Hkv * g, S, E))

    return (rep(src[0]), rep(src[1])) + tuple(src[2:])


def _qkv(xp, ro, p, x, pos_arr, theta: float = ROPE_BASE):
    """x: [B, T, D] -> q [B, H, T, E], k, v [B, Hkv, T, E] (heads: the weight's rows / E),
    rotated at ``pos_arr`` when rope."""
    B, T, D = x.shape
    E = ro.head_dim

    def proj(name, rotate):
        y = xp.reshape(linear(xp, x, p[name]), (B, T, p[name].shape[0] // E, E))
        if rotate and ro.positions == "rope":
            y = rope(xp, y, pos_arr, theta)
        return xp.permute_dims(y, (0, 2, 1, 3))

    return proj("q_proj.weight", True), proj("k_proj.weight", True), proj("v_proj.weight", False)


def _fading_kv(xp, spec, p, s, pos_arr):
    kname = "k_proj.weight" if spec.tie_fading else "k_fading_proj.weight"
    vname = "v_proj.weight" if spec.tie_fading else "v_fading_proj.weight"
    q_like = {"k_proj.weight": p[kname], "v_proj.weight": p[vname], "q_proj.weight": p[kname]}
    _, fk, fv = _qkv(xp, spec.readout, q_like, s, pos_arr)
    return fk, fv


def _merge_out(xp, p, o):
    """o: [B, H, T, E] -> [B, T, D] @ o_proj."""
    B, H, T, E = o.shape
    return linear(xp, xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (B, T, H * E)),
                  p["o_proj.weight"])


def _block_state(state):
    return {"pos": state["pos"], "conv": state["conv"], "ssm": state["ssm"]}


def _store_update(new, cand, kept):
    new.update({"cand_" + f: a for f, a in cand.items()})
    new.update({"store_" + f: a for f, a in kept.items()})


def forward(spec, params, x, state, bounds=None):
    """Parallel form. x: [B, T, D] at positions pos .. pos+T-1 -> (y, state, aux).
    ``bounds``: a packed row's checked cu_seqlens (from the empty state): positions, windows,
    the Mamba block and the store restart at every document; the state is the last one's."""
    xp, p, ro = namespace(x), params, spec.readout
    B, T, _ = x.shape
    pos, W = state["pos"], ro.window
    qpos = seq_positions(xp, pos, T, x) if bounds is None else doc_positions(xp, bounds, x)
    q, k, v = _qkv(xp, ro, p, x, qpos, _theta(spec))
    new = {"pos": pos + (T if bounds is None else T - bounds[-2])}

    src, new["k"], new["v"] = raw_source(xp, k, v, state["k"], state["v"], pos, W, bounds)
    sources = [_shared(xp, spec, src)]

    s = None
    if ro.fading:
        s, block, _ = mamba.forward(spec.fading_block, _sub(p, "fading."), x, _block_state(state),
                                    bounds)
        new.update({k_: a for k_, a in block.items() if k_ != "pos"})
        fk, fv = _fading_kv(xp, spec, p, s, qpos)
        src, new["fk"], new["fv"] = fading_source(xp, fk, fv, state["fk"], state["fv"], pos, W,
                                                  bounds)
        sources.append(src)

    aux = None
    if ro.store is not None:
        if s is not None:
            s_prev = xp.concat([state["s_last"][:, None, :], s[:, :T - 1]], axis=1)
            if bounds is not None:  # a document's first prediction is from s_0 = 0
                s_prev = xp.where((qpos == 0)[None, :, None], xp.zeros_like(s_prev), s_prev)
            scores = es.innovation_scores(x, s_prev, p["pred_proj.weight"])
        else:
            scores = es.innovation_scores(x, None, None)
        # Scores only rank tokens; the selection is not differentiable.
        toks = {"k": k, "v": v, "score": scores, "pos": xp.broadcast_to(qpos[None, :], (B, T))}
        if bounds is None:
            src, cand, kept = es.select_chunks(xp, ro.store, toks, _entries(state, "cand_"),
                                               _entries(state, "store_"), pos)
        else:
            src, cand, kept = es.select_packed(xp, ro.store, toks, bounds)
        sources.append(src)
        aux = xp.mean(scores)
        new["s_last"] = s[:, T - 1] if s is not None else state["s_last"]
        _store_update(new, cand, kept)

    y = _merge_out(xp, p, readout(xp, q, sources))
    return y, new, aux


def step(spec, params, x_t, state):
    """Streaming form. x_t: [B, D] at position pos -> (y_t, state, aux)."""
    xp, p, ro = namespace(x_t), params, spec.readout
    B, D = x_t.shape
    pos, W = state["pos"], ro.window
    x = x_t[:, None, :]
    qpos = seq_positions(xp, pos, 1, x_t)
    q, k, v = _qkv(xp, ro, p, x, qpos, _theta(spec))  # [B, H, 1, E]
    new = {"pos": pos + 1}
    src, new["k"], new["v"] = raw_source_step(xp, k[:, :, 0], v[:, :, 0], state["k"],
                                              state["v"], pos, W)
    sources = [_shared(xp, spec, src)]

    s_t = None
    if ro.fading:
        s_t, block, _ = mamba.step(spec.fading_block, _sub(p, "fading."), x_t,
                                   _block_state(state))
        new.update({k_: a for k_, a in block.items() if k_ != "pos"})
        fk, fv = _fading_kv(xp, spec, p, s_t[:, None, :], qpos)
        src, new["fk"], new["fv"] = fading_source_step(xp, fk[:, :, 0], fv[:, :, 0], state["fk"],
                                                       state["fv"], pos, W)
        sources.append(src)

    aux = None
    if ro.store is not None:
        kept = _entries(state, "store_")
        sources.append(es.visible_step(ro.store, kept, pos))
        pred = p["pred_proj.weight"] if ro.fading else None
        score = es.innovation_scores(x, state["s_last"][:, None, :] if ro.fading else None,
                                     pred)  # [B, 1]
        aux = xp.mean(score)
        tok = {"k": k, "v": v, "score": score,
               "pos": xp.full((B, 1), pos, dtype=xp.int64, device=device(x_t))}
        cand, kept = es.select_step(xp, ro.store, tok, _entries(state, "cand_"), kept, pos)
        new["s_last"] = s_t if ro.fading else state["s_last"]
        _store_update(new, cand, kept)

    y = _merge_out(xp, p, readout(xp, q, sources))[:, 0]
    return y, new, aux
