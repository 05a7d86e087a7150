"""Eidetic store and innovation selection (DESIGN 2.4), fixed shapes throughout.

An entry set is a dict: ``k``, ``v`` [B, H, S, E]; ``score`` [B, S]; ``pos`` [B, S] (int,
< 0 marks an empty slot). Total order: filled before empty; higher score first (a NaN score
above every other); on equal score the later position first; empty slots by index.

Selection uses ``lax.top_k`` on an exact key: top_k breaks ties by lower index, and after a
merge equal scores do not sit in position order, while a single packed (score, position) key
would not fit in 64 bits for float64 scores. So the key is each entry's rank in the total
order, counted by pairwise comparison (S is small: chunk + select, or capacity + select);
ranks are distinct, so top_k sees no tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .numerics import POS_DTYPE, partial

FIELDS = ("k", "v", "score", "pos")


def empty(batch: int, heads: int, slots: int, head_dim: int, dtype) -> dict:
    return {
        "k": jnp.zeros((batch, heads, slots, head_dim), dtype),
        "v": jnp.zeros((batch, heads, slots, head_dim), dtype),
        "score": jnp.zeros((batch, slots), dtype),
        "pos": jnp.full((batch, slots), -1, POS_DTYPE),
    }


def concat(a: dict, b: dict) -> dict:
    return {f: jnp.concatenate([a[f], b[f]], axis=2 if f in ("k", "v") else 1) for f in FIELDS}


def ranks(score, pos):
    """rank[b, i]: how many entries come before entry i in the total order, [B, S] int32.
    Positions of filled entries are distinct, so ranks are a permutation of 0 .. S - 1.
    A NaN score ranks above every other score (NaNs among themselves by position): compared
    as they are, a NaN would neither beat nor be beaten, ranks would tie, and the selection
    would keep an arbitrary entry."""
    S = score.shape[1]
    sc = jax.lax.stop_gradient(score)
    filled = pos >= 0
    si, sj = sc[:, :, None], sc[:, None, :]  # i: the entry ranked, j: a competitor
    ni, nj = jnp.isnan(si), jnp.isnan(sj)
    higher = (nj & ~ni) | (sj > si)
    tied = (ni & nj) | (sj == si)
    pi, pj = pos[:, :, None], pos[:, None, :]
    fi, fj = filled[:, :, None], filled[:, None, :]
    idx = jnp.arange(S)
    beats = ((fj & ~fi) | (fi & fj & (higher | (tied & (pj > pi))))
             | (~fi & ~fj & (idx[None, :] < idx[:, None])[None]))
    return jnp.sum(beats, axis=2, dtype=jnp.int32)


def order(score, pos):
    """Indices [B, S] of the entries in the total order. The key is the exact rank, so
    ``lax.top_k`` (whose tie rule differs from the store's) never sees a tie."""
    r = ranks(score, pos)
    return jax.lax.top_k(-r, r.shape[1])[1]


def top(entries: dict, n: int) -> dict:
    """The first ``n`` entries in the total order, in that order (empty slots fill the rest)."""
    B, H, S, E = entries["k"].shape
    if n == 0 or S == 0:
        return empty(B, H, n, E, entries["k"].dtype)
    idx = order(entries["score"], entries["pos"])[:, :n]
    # take_along_axis is a gather: gradients flow into the chosen keys and values.
    k = jnp.take_along_axis(entries["k"], idx[:, None, :, None], axis=2)
    v = jnp.take_along_axis(entries["v"], idx[:, None, :, None], axis=2)
    score = jnp.take_along_axis(entries["score"], idx, axis=1)
    pos = jnp.take_along_axis(entries["pos"], idx, axis=1)
    if n > S:
        pad = empty(B, H, n - S, E, k.dtype)
        k, v = (jnp.concatenate([a, pad[f]], axis=2) for a, f in ((k, "k"), (v, "v")))
        score = jnp.concatenate([score, pad["score"]], axis=1)
        pos = jnp.concatenate([pos, pad["pos"]], axis=1)
    filled = pos >= 0
    zero = jnp.zeros((), k.dtype)
    return {
        "k": jnp.where(filled[:, None, :, None], k, zero),
        "v": jnp.where(filled[:, None, :, None], v, zero),
        "score": jnp.where(filled, score, zero),
        "pos": jnp.where(filled, pos, -1).astype(POS_DTYPE),
    }


def merge(a: dict, b: dict, n: int) -> dict:
    """The best ``n`` of a union b (associative)."""
    return top(concat(a, b), n)


def select(cond, a: dict, b: dict) -> dict:
    """``a`` where the scalar ``cond`` holds, else ``b``."""
    return {f: jnp.where(cond, a[f], b[f]) for f in FIELDS}


def innovation_scores(x, s_prev, pred_weight):
    """r_t = mean((x_t - s_{t-1} Wpred^T)^2) over features; x, s_prev [B, T, D] -> [B, T]."""
    xhat = 0.0 if pred_weight is None else jnp.matmul(s_prev, pred_weight.T)
    return jnp.mean((x - xhat) ** 2, axis=-1)


def chunk_layout(pos, T: int, C: int):
    """Lay the call's T tokens on whole chunks: flat slot f holds token f - (pos % C).

    Returns (token index per slot [L] clipped into range, slot-holds-a-token mask [L],
    absolute position per slot [L], offset, number of chunks nc), with L = nc * C.
    """
    nc = -(-(T + C - 1) // C)
    off = jnp.remainder(pos, C)
    f = jnp.arange(nc * C)
    tok = f - off
    valid = (tok >= 0) & (tok < T)
    return jnp.clip(tok, 0, T - 1), valid, (pos - off + f).astype(POS_DTYPE), off, nc


def parallel(k, v, scores, state: dict, pos, C: int, K: int, M: int):
    """The store over one call, chunk by chunk.

    k, v: [B, H, T, E]; scores: [B, T]; state: the ``cand_*`` and ``store_*`` arrays.
    Returns (per-chunk snapshots of the store visible to that chunk's queries:
    k, v [B, H, nc, M, E], pos [B, nc, M]; the chunk layout; new cand; new store).
    """
    B, H, T, E = k.shape
    tok, valid, fpos, off, nc = chunk_layout(pos, T, C)

    def lay(a, axis):
        return jnp.take(a, tok, axis=axis)

    seg = {
        "k": lay(k, 2).reshape(B, H, nc, C, E),
        "v": lay(v, 2).reshape(B, H, nc, C, E),
        "score": jnp.where(valid, lay(jax.lax.stop_gradient(scores), 1), 0.0).reshape(B, nc, C),
        "pos": jnp.where(valid, fpos, -1)[None].repeat(B, 0).reshape(B, nc, C),
    }
    run = {f: state["cand_" + f] for f in FIELDS}
    blank = empty(B, H, K, E, k.dtype)
    # Chunk 0 continues the state's running candidates; later chunks start empty.
    lead = {f: jnp.stack([run[f]] + [blank[f]] * (nc - 1), axis=2 if f in ("k", "v") else 1)
            for f in FIELDS}
    both = {f: jnp.concatenate([lead[f], seg[f]], axis=3 if f in ("k", "v") else 2)
            for f in FIELDS}
    # Fold chunks into the batch to pick each chunk's best K at once.
    S = K + C
    flat = {"k": jnp.moveaxis(both["k"], 2, 1).reshape(B * nc, H, S, E),
            "v": jnp.moveaxis(both["v"], 2, 1).reshape(B * nc, H, S, E),
            "score": both["score"].reshape(B * nc, S), "pos": both["pos"].reshape(B * nc, S)}
    picked = top(flat, K)
    cands = {f: (a.reshape(B, nc, H, K, E) if f in ("k", "v") else a.reshape(B, nc, K))
             for f, a in picked.items()}  # chunk axis 1
    # Chunk r is complete when its last slot lies inside this call.
    complete = (jnp.arange(nc) + 1) * C <= off + T
    kept0 = {f: state["store_" + f] for f in FIELDS}

    def body(kept, xs):
        cand_r, done = xs
        merged = merge(kept, cand_r, M) if M > 0 else kept
        return select(done, merged, kept), kept

    xs = ({f: jnp.moveaxis(a, 1, 0) for f, a in cands.items()}, complete)
    kept, snaps = jax.lax.scan(body, kept0, xs)
    r_last = (off + T - 1) // C
    last = {f: jnp.take(a, r_last, axis=1) for f, a in cands.items()}
    last_done = (r_last + 1) * C == off + T
    new_cand = select(last_done, blank, last)
    snap = {"k": jnp.moveaxis(snaps["k"], 0, 2), "v": jnp.moveaxis(snaps["v"], 0, 2),
            "pos": jnp.moveaxis(snaps["pos"], 0, 1)}
    return snap, (tok, valid, fpos, off, nc), new_cand, kept


def visible_partial(q, snap, layout, W: int, C: int, scale: float):
    """The store as a softmax source: queries q [B, H, T, E] laid out on chunks, each chunk
    against its own snapshot (entries with position <= t - W are visible from t)."""
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


# --- packed rows (DESIGN 5a): chunks restart at every document, boundaries traced ----------

def packed_chunks(cu, T: int, C: int):
    """The chunks of a packed row, each document's counted from its first token, on a static
    number of chunk slots nC = min(ceil(T / C) + N - 1, T) (a document of n tokens has
    ceil(n / C) chunks; these sum to at most that). Returns a dict of
    ``tok`` [nC, C] (token of each slot, clipped into range), ``tvalid`` [nC, C] (the slot
    holds a token), ``first`` [nC] (a document's first chunk), ``complete`` [nC] (C tokens),
    ``last`` (0-d: the last chunk in use), ``at`` [T] (each token's flat slot)."""
    N = cu.shape[0] - 1
    nC = min(-(-T // C) + N - 1, T)
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    count = (lens + C - 1) // C
    ends = jnp.cumsum(count)
    g = jnp.arange(nC, dtype=cu.dtype)
    in_use = g < ends[-1]
    d = jnp.clip(jnp.searchsorted(ends, g, side="right"), 0, N - 1)
    r = g - (ends[d] - count[d])  # the chunk's index within its document
    length = jnp.where(in_use, jnp.clip(lens[d] - r * C, 0, C), 0)
    i = jnp.arange(C, dtype=cu.dtype)
    seg = jnp.searchsorted(cu[1:], jnp.arange(T, dtype=cu.dtype), side="right")
    dpos = jnp.arange(T, dtype=cu.dtype) - cu[seg]
    return {"tok": jnp.clip(starts[d][:, None] + r[:, None] * C + i[None, :], 0, T - 1),
            "tvalid": i[None, :] < length[:, None], "first": in_use & (r == 0),
            "complete": length == C, "last": ends[-1] - 1,
            "at": (ends[seg] - count[seg] + dpos // C) * C + dpos % C}


def packed_parallel(k, v, scores, dpos, cu, C: int, K: int, M: int):
    """The store over a packed row: every document selects from an empty store, in its own
    chunks. k, v: [B, H, T, E]; scores: [B, T]; dpos: [T] positions within documents.
    Returns (per-chunk-slot snapshots of the store visible to that chunk's queries, the chunk
    layout, the last document's cand and store)."""
    B, H, T, E = k.shape
    lay = packed_chunks(cu, T, C)
    nC = lay["tok"].shape[0]
    tok, ok = lay["tok"].reshape(-1), lay["tvalid"].reshape(-1)
    chunk = {  # chunks folded into the batch, to pick each chunk's best K at once
        "k": jnp.moveaxis(jnp.take(k, tok, axis=2).reshape(B, H, nC, C, E), 2, 1),
        "v": jnp.moveaxis(jnp.take(v, tok, axis=2).reshape(B, H, nC, C, E), 2, 1),
        "score": jnp.where(ok, jnp.take(jax.lax.stop_gradient(scores), tok, axis=1), 0.0),
        "pos": jnp.broadcast_to(jnp.where(ok, dpos[tok], -1).astype(POS_DTYPE), (B, nC * C)),
    }
    flat = {"k": chunk["k"].reshape(B * nC, H, C, E), "v": chunk["v"].reshape(B * nC, H, C, E),
            "score": chunk["score"].reshape(B * nC, C), "pos": chunk["pos"].reshape(B * nC, C)}
    picked = top(flat, K)
    cands = {f: (a.reshape(B, nC, H, K, E) if f in ("k", "v") else a.reshape(B, nC, K))
             for f, a in picked.items()}
    blank_store = empty(B, H, M, E, k.dtype)

    def body(kept, xs):
        cand_r, first, done = xs
        kept = select(first, blank_store, kept)  # a document starts from the empty store
        merged = merge(kept, cand_r, M) if M > 0 else kept
        return select(done, merged, kept), kept

    xs = ({f: jnp.moveaxis(a, 1, 0) for f, a in cands.items()}, lay["first"], lay["complete"])
    kept, snaps = jax.lax.scan(body, blank_store, xs)
    last = {f: jnp.take(a, lay["last"], axis=1) for f, a in cands.items()}
    new_cand = select(lay["complete"][lay["last"]], empty(B, H, K, E, k.dtype), last)
    snap = {"k": jnp.moveaxis(snaps["k"], 0, 2), "v": jnp.moveaxis(snaps["v"], 0, 2),
            "pos": jnp.moveaxis(snaps["pos"], 0, 1)}
    return snap, lay, new_cand, kept


def packed_visible_partial(q, snap, lay, dpos, W: int, scale: float):
    """The store as a softmax source over a packed row: queries q [B, H, T, E] laid out on
    the chunk slots, each chunk against its own snapshot (entries of its document with
    position <= t - W, positions within the document)."""
    B, H, T, E = q.shape
    nC, C = lay["tok"].shape
    tok = lay["tok"].reshape(-1)
    qc = jnp.take(q, tok, axis=2).reshape(B, H, nC, C, E)
    qpos = dpos[lay["tok"]]  # [nC, C]
    spos = snap["pos"]  # [B, nC, M]
    mask = (spos[:, :, None, :] >= 0) & (spos[:, :, None, :] <= qpos[None, :, :, None] - W)
    scores = jnp.einsum("bhnce,bhnme->bhncm", qc, snap["k"]) * scale
    m, l, o = partial(scores, mask[:, None], snap["v"])
    at = lay["at"]
    return (jnp.take(m.reshape(B, H, nC * C), at, axis=2),
            jnp.take(l.reshape(B, H, nC * C), at, axis=2),
            jnp.take(o.reshape(B, H, nC * C, E), at, axis=2))


# --- the primitive's public functions, on the reference's entry sets --------------------------

def _check_entries(name: str, e):
    if not isinstance(e, dict) or set(e) != set(FIELDS):
        raise ValueError(f"{name} must be an entry set with keys {list(FIELDS)}, got "
                         f"{sorted(e) if isinstance(e, dict) else type(e).__name__}")


def store_top(entries: dict, n: int) -> dict:
    """The first n entries (k, v [B, H, S, E], score, pos [B, S]) in the store's order."""
    _check_entries("entries", entries)
    out = top({f: jnp.asarray(a) for f, a in entries.items()}, int(n))
    out["pos"] = out["pos"].astype(jnp.asarray(entries["pos"]).dtype)
    return out


def store_merge(a: dict, b: dict, n: int) -> dict:
    """The best n entries of the union of two entry sets (associative)."""
    _check_entries("a", a)
    _check_entries("b", b)
    return store_top(concat({f: jnp.asarray(x) for f, x in a.items()},
                            {f: jnp.asarray(x).astype(jnp.asarray(a[f]).dtype)
                             for f, x in b.items()}), n)
