"""Windowed-attention layers: transformer, bmojo_f and bmojo share this code (DESIGN 2.3, 2.4).

Sources of the one softmax, for a query at position t:
  raw     positions (t-W, t]           keys/values from x            (all j <= t if W is None)
  fading  positions (t-2W, t-W]        keys/values from the Mamba block's output s
  store   entries with position <= t-W of the store after the chunk before t's chunk

State: ``k``, ``v`` [B, H, W, E] ring of raw keys (grows as a KV cache when W is None);
``fk``, ``fv`` [B, H, 2W, E] ring of fading keys (a fading key is needed from W to 2W-1 steps
after it is made); ``conv``, ``ssm`` of the Mamba block; for bmojo ``s_last`` [B, D] (the last
fading output, for the next prediction), ``cand_*`` (running top ``select`` of the current chunk)
and ``store_*`` (``capacity`` entries).
"""

from __future__ import annotations

from . import mamba, store
from ._xp import device, linear
from .attention import (
    fading_source,
    fading_source_step,
    positions,
    raw_source,
    raw_source_step,
    readout,
)
from .rope import rope


def _flags(spec):
    fading = bool(getattr(spec, "fading", False))
    st = getattr(spec, "store", None)
    return fading, st


def _sub(p: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def init_state(xp, spec, batch: int, dtype, like):
    H, E, W = spec.n_heads, spec.head_dim, spec.window
    dev = device(like)
    raw = 0 if W is None else W
    state = {"k": xp.zeros((batch, H, raw, E), dtype=dtype, device=dev)}
    state["v"] = state["k"]
    fading, st = _flags(spec)
    if fading:
        state["fk"] = xp.zeros((batch, H, 2 * W, E), dtype=dtype, device=dev)
        state["fv"] = state["fk"]
        state.update(mamba.init_state(xp, spec.fading_block, batch, dtype, like))
    if st is not None:
        state["s_last"] = xp.zeros((batch, spec.d_model), dtype=dtype, device=dev)
        for prefix, n in (("cand_", st.select), ("store_", st.capacity)):
            for f, a in store.empty(xp, batch, H, n, E, dtype, like).items():
                state[prefix + f] = a
    return state


def _entries(state, prefix):
    return {f: state[prefix + f] for f in store.FIELDS}


def _qkv(xp, spec, p, x, pos_arr):
    """x: [B, T, D] -> q, k, v as [B, H, T, E], rotated at ``pos_arr`` when rope."""
    B, T, D = x.shape
    H, E = spec.n_heads, spec.head_dim

    def proj(name, rotate):
        y = xp.reshape(linear(xp, x, p[name]), (B, T, H, E))
        if rotate and spec.positions == "rope":
            y = rope(xp, y, pos_arr)
        return xp.permute_dims(y, (0, 2, 1, 3))

    return proj("q_proj.weight", True), proj("k_proj.weight", True), proj("v_proj.weight", False)


def _fading_kv(xp, spec, p, s, pos_arr):
    kname = "k_proj.weight" if spec.tie_fading else "k_fading_proj.weight"
    vname = "v_proj.weight" if spec.tie_fading else "v_fading_proj.weight"
    q_like = {"k_proj.weight": p[kname], "v_proj.weight": p[vname], "q_proj.weight": p[kname]}
    _, fk, fv = _qkv(xp, spec, q_like, s, pos_arr)
    return fk, fv


def _merge_out(xp, spec, p, o):
    """o: [B, H, T, E] -> [B, T, D] @ o_proj."""
    B, H, T, E = o.shape
    return linear(xp, xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (B, T, H * E)),
                  p["o_proj.weight"])


def forward(xp, spec, p, x, state, pos: int):
    """Parallel form. x: [B, T, D] at positions pos .. pos+T-1 -> (y, state, aux)."""
    B, T, _ = x.shape
    W = spec.window
    fading, st = _flags(spec)
    qpos = positions(xp, pos, T, x)
    q, k, v = _qkv(xp, spec, p, x, qpos)
    new = {}

    src, new["k"], new["v"] = raw_source(xp, k, v, state["k"], state["v"], pos, W)
    sources = [src]

    s = None
    if fading:
        s, mstate = mamba.forward(xp, spec.fading_block, _sub(p, "fading."), x,
                                  {"conv": state["conv"], "ssm": state["ssm"]})
        new.update(mstate)
        fk, fv = _fading_kv(xp, spec, p, s, qpos)
        src, new["fk"], new["fv"] = fading_source(xp, fk, fv, state["fk"], state["fv"], pos, W)
        sources.append(src)

    aux = None
    if st is not None:
        src, aux, store_state = _store_parallel(xp, spec, st, p, x, s, k, v, state, pos, qpos)
        sources.append(src)
        new.update(store_state)

    y = _merge_out(xp, spec, p, readout(xp, q, sources))
    return y, new, aux


def _store_parallel(xp, spec, st, p, x, s, k, v, state, pos, qpos):
    B, T, _ = x.shape
    H, E, W, C = spec.n_heads, spec.head_dim, spec.window, st.chunk
    if s is not None:
        s_prev = xp.concat([state["s_last"][:, None, :], s[:, :T - 1]], axis=1)
        scores = store.innovation_scores(xp, x, s_prev, p["pred_proj.weight"])
    else:
        scores = store.innovation_scores(xp, x, None, None)
    # Scores only rank tokens; the selection is not differentiable.
    toks = {"k": k, "v": v, "score": scores,
            "pos": xp.broadcast_to(qpos[None, :], (B, T))}
    cand, kept = _entries(state, "cand_"), _entries(state, "store_")
    snaps, snap_chunk = [], []
    a = pos
    while a < pos + T:
        c = a // C
        b = min((c + 1) * C, pos + T)
        snaps.append(kept)
        snap_chunk.append(c)
        seg = {f: (toks[f][:, :, a - pos:b - pos] if f in ("k", "v")
                   else toks[f][:, a - pos:b - pos]) for f in store.FIELDS}
        cand = store.merge(xp, cand, seg, st.select)
        if b == (c + 1) * C:
            kept = store.merge(xp, kept, cand, st.capacity)
            cand = store.empty(xp, B, H, st.select, E, x.dtype, x)
        a = b
    M = st.capacity
    sk = xp.concat([e["k"] for e in snaps], axis=2)
    sv = xp.concat([e["v"] for e in snaps], axis=2)
    spos = xp.concat([e["pos"] for e in snaps], axis=1)  # [B, nS * M]
    chunk_of_entry = xp.concat([xp.full((M,), c, dtype=xp.int64, device=device(x))
                                for c in snap_chunk])
    qchunk = qpos // C
    mask = ((chunk_of_entry[None, :] == qchunk[:, None])[None, None]
            & (spos[:, None, None, :] >= 0)
            & (spos[:, None, None, :] <= qpos[None, None, :, None] - W))
    new = {"s_last": s[:, T - 1] if s is not None else state["s_last"]}
    new.update({"cand_" + f: a for f, a in cand.items()})
    new.update({"store_" + f: a for f, a in kept.items()})
    return (sk, sv, mask), xp.mean(scores), new


def step(xp, spec, p, x_t, state, pos: int):
    """Streaming form. x_t: [B, D] at position pos -> (y_t, state, aux)."""
    B, D = x_t.shape
    W = spec.window
    fading, st = _flags(spec)
    x = x_t[:, None, :]
    qpos = positions(xp, pos, 1, x_t)
    q, k, v = _qkv(xp, spec, p, x, qpos)  # [B, H, 1, E]
    new = {}
    src, new["k"], new["v"] = raw_source_step(xp, k[:, :, 0], v[:, :, 0], state["k"],
                                              state["v"], pos, W)
    sources = [src]

    s_t = None
    if fading:
        s_t, mstate = mamba.step(xp, spec.fading_block, _sub(p, "fading."), x_t,
                                 {"conv": state["conv"], "ssm": state["ssm"]})
        new.update(mstate)
        fk, fv = _fading_kv(xp, spec, p, s_t[:, None, :], qpos)
        src, new["fk"], new["fv"] = fading_source_step(xp, fk[:, :, 0], fv[:, :, 0], state["fk"],
                                                       state["fv"], pos, W)
        sources.append(src)

    aux = None
    if st is not None:
        kept = _entries(state, "store_")
        visible = (kept["pos"] >= 0) & (kept["pos"] <= pos - W)  # [B, M]
        sources.append((kept["k"], kept["v"], visible[:, None, None, :]))
        pred = p["pred_proj.weight"] if fading else None
        score = store.innovation_scores(xp, x, state["s_last"][:, None, :] if fading else None,
                                        pred)  # [B, 1]
        aux = xp.mean(score)
        tok = {"k": k, "v": v, "score": score,
               "pos": xp.full((B, 1), pos, dtype=xp.int64, device=device(x_t))}
        cand = store.merge(xp, _entries(state, "cand_"), tok, st.select)
        if (pos + 1) % st.chunk == 0:
            kept = store.merge(xp, kept, cand, st.capacity)
            cand = store.empty(xp, B, spec.n_heads, st.select, spec.head_dim, x_t.dtype, x_t)
        new["s_last"] = s_t if fading else state["s_last"]
        new.update({"cand_" + f: a for f, a in cand.items()})
        new.update({"store_" + f: a for f, a in kept.items()})

    y = _merge_out(xp, spec, p, readout(xp, q, sources))[:, 0]
    return y, new, aux
