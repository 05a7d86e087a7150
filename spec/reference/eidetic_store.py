"""Eidetic store and innovation selection (DESIGN 2.4): scores, the total order, top and merge,
and the store's source for the windowed readout in both forms.

An entry set is a dict of arrays over an entry axis of length S:
``k``, ``v``: [B, H, S, E]; ``score``: [B, S]; ``pos``: [B, S] (int, < 0 marks an empty slot).

Total order, everywhere: a filled slot before an empty one; higher score first (a NaN score
above every number, +inf included, as torch's descending sort puts it); on equal score (or two
NaNs), the later position first. Positions of filled entries are
distinct, so the order is strict on them; empty slots are ordered by index so ranks stay a
permutation.
"""

from __future__ import annotations

from .numerics import device, gather_rows, namespace
from .rings import seq_positions

__all__ = ["innovation_scores", "store_top", "store_merge"]

FIELDS = ("k", "v", "score", "pos")


def empty(xp, batch: int, heads: int, slots: int, head_dim: int, dtype, like):
    dev = device(like)
    return {
        "k": xp.zeros((batch, heads, slots, head_dim), dtype=dtype, device=dev),
        "v": xp.zeros((batch, heads, slots, head_dim), dtype=dtype, device=dev),
        "score": xp.zeros((batch, slots), dtype=dtype, device=dev),
        "pos": xp.full((batch, slots), -1, dtype=xp.int64, device=dev),
    }


def concat(xp, a: dict, b: dict) -> dict:
    return {f: xp.concat([a[f], b[f]], axis=2 if f in ("k", "v") else 1) for f in FIELDS}


def ranks(xp, score, pos):
    """rank[b, i] = number of entries that come before entry i in the total order. [B, S]."""
    S = score.shape[1]
    filled = pos >= 0
    # NaN compares false with everything, which would leave two entries sharing a rank. It
    # ranks above every number and ties with NaN, and the position breaks the tie, so the
    # order stays strict (the torch, JAX and Triton forms use the same rule).
    si, sj = score[:, :, None], score[:, None, :]  # i: the entry ranked, j: a competitor
    ni, nj = xp.isnan(si), xp.isnan(sj)
    higher = (nj & ~ni) | (sj > si)
    tied = (ni & nj) | (sj == si)
    pi, pj = pos[:, :, None], pos[:, None, :]
    fi, fj = filled[:, :, None], filled[:, None, :]
    idx = xp.arange(S, device=device(score))
    earlier_index = (idx[None, :] < idx[:, None])[None, :, :]
    both_filled = fi & fj
    beats = (
        (fj & ~fi)
        | (both_filled & (higher | (tied & (pj > pi))))
        | (~fi & ~fj & earlier_index)
    )
    return xp.sum(xp.astype(beats, xp.int64), axis=2)


def top(xp, entries: dict, n: int) -> dict:
    """The first ``n`` entries in the total order, in that order (empty slots fill the rest)."""
    r = ranks(xp, entries["score"], entries["pos"])  # [B, S]
    slot = xp.arange(n, dtype=xp.int64, device=device(r))
    onehot = slot[None, :, None] == r[:, None, :]  # [B, n, S]
    pick = onehot[:, None, :, :]  # [B, 1, n, S]
    zero_s = xp.zeros_like(entries["score"])[:, None, :]
    return {
        # A gather copies entries verbatim and keeps gradients flowing into the stored keys
        # and values.
        "k": gather_rows(xp, pick, entries["k"]),
        "v": gather_rows(xp, pick, entries["v"]),
        "score": xp.sum(xp.where(onehot, entries["score"][:, None, :], zero_s), axis=2),
        "pos": xp.sum(xp.where(onehot, entries["pos"][:, None, :],
                               xp.zeros_like(entries["pos"])[:, None, :]), axis=2)
        - xp.astype(~xp.any(onehot, axis=2), xp.int64),
    }


def merge(xp, a: dict, b: dict, n: int) -> dict:
    """The best ``n`` of a union b. Associative, so chunk stores can be built by a scan."""
    return top(xp, concat(xp, a, b), n)


def store_top(entries: dict, n: int) -> dict:
    """The first n entries of an entry set (keys k, v [B, H, S, E], score, pos [B, S]) in the
    store's total order: filled first, higher score first, later position first on ties."""
    return top(namespace(entries["k"]), entries, n)


def store_merge(a: dict, b: dict, n: int) -> dict:
    """The best n entries of the union of two entry sets (associative)."""
    return merge(namespace(a["k"]), a, b, n)


def innovation_scores(x, s_prev, pred_weight):
    """r_t = mean((x_t - s_{t-1} pred_weight^T)^2) over features: x, s_prev [B, T, D] -> [B, T].
    Without a predictor (``pred_weight`` None) the prediction is 0."""
    xp = namespace(x)
    if pred_weight is None:
        xhat = xp.zeros_like(x)
    else:
        xhat = xp.matmul(s_prev, xp.permute_dims(pred_weight, (1, 0)))
    return xp.mean((x - xhat) ** 2, axis=-1)


# --- the store as a source of the windowed readout ------------------------------------------

def select_chunks(xp, store, toks: dict, cand: dict, kept: dict, pos: int):
    """Parallel form for the tokens ``toks`` (an entry set over T positions pos .. pos+T-1):
    per chunk the best ``store.select`` candidates (a partial chunk continues ``cand``), merged
    into the best ``store.capacity`` at each chunk end. A query at position t in chunk c sees
    the store after chunk c - 1, entries with position <= t - window.

    Returns ((keys, values, mask [B, 1, T, S]) of the visible entries, cand, kept)."""
    B, H, T, E = toks["k"].shape
    C, W, M = store.chunk, store.window, store.capacity
    snaps, snap_chunk = [], []
    a = pos
    while a < pos + T:
        c = a // C
        b = min((c + 1) * C, pos + T)
        snaps.append(kept)
        snap_chunk.append(c)
        seg = {f: (toks[f][:, :, a - pos:b - pos] if f in ("k", "v")
                   else toks[f][:, a - pos:b - pos]) for f in FIELDS}
        cand = merge(xp, cand, seg, store.select)
        if b == (c + 1) * C:
            kept = merge(xp, kept, cand, M)
            cand = empty(xp, B, H, store.select, E, toks["k"].dtype, toks["k"])
        a = b
    sk = xp.concat([e["k"] for e in snaps], axis=2)
    sv = xp.concat([e["v"] for e in snaps], axis=2)
    spos = xp.concat([e["pos"] for e in snaps], axis=1)  # [B, nS * M]
    chunk_of_entry = xp.concat([xp.full((M,), c, dtype=xp.int64, device=device(sk))
                                for c in snap_chunk])
    qpos = seq_positions(xp, pos, T, sk)
    qchunk = qpos // C
    mask = ((chunk_of_entry[None, :] == qchunk[:, None])[None, None]
            & (spos[:, None, None, :] >= 0)
            & (spos[:, None, None, :] <= qpos[None, None, :, None] - W))
    return (sk, sv, mask), cand, kept


def select_packed(xp, store, toks: dict, bounds):
    """``select_chunks`` over a packed row (``bounds``: its checked cu_seqlens): every document
    selects from an empty store and empty candidates, its chunks counted from its first token
    (``toks["pos"]`` holds positions within documents), and a query sees only its own
    document's store. Returns ((keys, values, mask [B, 1, T, S]), cand, kept) with the last
    document's candidates and store."""
    B, H, T, E = toks["k"].shape
    dtype = toks["k"].dtype
    keys, vals, masks = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        doc = {f: (toks[f][:, :, a:b] if f in ("k", "v") else toks[f][:, a:b]) for f in FIELDS}
        (sk, sv, m), cand, kept = select_chunks(
            xp, store, doc, empty(xp, B, H, store.select, E, dtype, toks["k"]),
            empty(xp, B, H, store.capacity, E, dtype, toks["k"]), 0)
        S = m.shape[-1]
        off = xp.zeros((B, 1, a, S), dtype=xp.bool, device=device(m))
        after = xp.zeros((B, 1, T - b, S), dtype=xp.bool, device=device(m))
        keys.append(sk)
        vals.append(sv)
        masks.append(xp.concat([off, m, after], axis=2))
    return ((xp.concat(keys, axis=2), xp.concat(vals, axis=2), xp.concat(masks, axis=3)),
            cand, kept)


def visible_step(store, kept: dict, pos: int):
    """Streaming form of the store's source for the query at ``pos``: (keys, values, mask
    [B, 1, 1, M]) of the entries with position <= pos - window."""
    visible = (kept["pos"] >= 0) & (kept["pos"] <= pos - store.window)  # [B, M]
    return kept["k"], kept["v"], visible[:, None, None, :]


def select_step(xp, store, tok: dict, cand: dict, kept: dict, pos: int):
    """Streaming form of the selection: merge the token at ``pos`` into the running candidates;
    at a chunk end they are merged into the store. Returns (cand, kept)."""
    cand = merge(xp, cand, tok, store.select)
    if (pos + 1) % store.chunk == 0:
        B, H, _, E = tok["k"].shape
        kept = merge(xp, kept, cand, store.capacity)
        cand = empty(xp, B, H, store.select, E, tok["k"].dtype, tok["k"])
    return cand, kept
