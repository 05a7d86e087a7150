"""Eidetic store and innovation selection (DESIGN 2.4), vectorised over chunks.

Public: ``innovation_scores``, ``store_top``, ``store_merge`` (the op's signatures) and, for
the bmojo layer, ``select`` (every chunk's store snapshot of a parallel call, on the torch path
or the Triton kernels of ``kernels/triton/eidetic_store.py``), ``store_partial`` (the readout of
the visible entries) and ``step`` (the streaming update).

An entry set is a dict: ``k``, ``v`` [B, H, ..., S, E]; ``score``, ``pos`` [B, ..., S]
(``pos < 0`` marks an empty slot). The total order is the reference's: filled before empty,
higher score first, on equal score the later position first. It is realised exactly by three
stable sorts (least significant key first), so ties never depend on the sort algorithm.
Gathers (not one-hot products) pick entries; gradients still reach the chosen keys/values.
"""

from __future__ import annotations

import torch

from .implementation import choose
from .numerics import partial

FIELDS = ("k", "v", "score", "pos")


def empty(batch: int, heads: int, slots: int, head_dim: int, dtype, device, lead=()):
    kv = (batch, heads, *lead, slots, head_dim)
    return {
        "k": torch.zeros(kv, dtype=dtype, device=device),
        "v": torch.zeros(kv, dtype=dtype, device=device),
        "score": torch.zeros((batch, *lead, slots), dtype=dtype, device=device),
        "pos": torch.full((batch, *lead, slots), -1, dtype=torch.int64, device=device),
    }


def order(score, pos):
    """Indices that sort the last axis into the total order. score, pos: [B, ..., S]."""
    idx = torch.argsort(pos, dim=-1, descending=True, stable=True)
    sc = torch.gather(score.detach(), -1, idx)
    idx = torch.gather(idx, -1, torch.argsort(sc, dim=-1, descending=True, stable=True))
    filled = torch.gather(pos, -1, idx) >= 0
    return torch.gather(idx, -1, torch.argsort(filled.to(torch.int8), dim=-1, descending=True,
                                               stable=True))


def take(entries: dict, idx) -> dict:
    """Entries at ``idx`` [B, ..., n] along the slot axis (a plain gather, so an empty slot
    keeps its zeros and gradients pass as through the reference's one-hot product)."""
    k = entries["k"]
    H, E = k.shape[1], k.shape[-1]
    # idx [B, ..., n] -> [B, H, ..., n, E] for the key/value gather.
    gi = idx.unsqueeze(1).unsqueeze(-1).expand(idx.shape[0], H, *idx.shape[1:], E)
    return {
        "k": torch.gather(k, -2, gi),
        "v": torch.gather(entries["v"], -2, gi),
        "score": torch.gather(entries["score"], -1, idx),
        "pos": torch.gather(entries["pos"], -1, idx),
    }


def concat(a: dict, b: dict) -> dict:
    return {f: torch.cat([a[f], b[f]], dim=-2 if f in ("k", "v") else -1) for f in FIELDS}


def top(entries: dict, n: int) -> dict:
    """The first n entries in the total order, in that order."""
    idx = order(entries["score"], entries["pos"])[..., :n]
    if idx.shape[-1] < n:  # fewer entries than slots: pad with empties
        extra = empty(entries["k"].shape[0], entries["k"].shape[1], n - idx.shape[-1],
                      entries["k"].shape[-1], entries["k"].dtype, entries["k"].device,
                      tuple(entries["pos"].shape[1:-1]))
        return concat(take(entries, idx), extra)
    return take(entries, idx)


def merge(a: dict, b: dict, n: int) -> dict:
    return top(concat(a, b), n)


def merge_into(dst: dict, b: dict) -> None:
    """``merge(dst, b, n)`` with n = dst's slots, written into dst's own tensors (a streaming
    step in place: the result is gathered first, so dst may be read while it is written)."""
    best = merge(dst, b, dst["pos"].shape[-1])
    for f in FIELDS:
        dst[f].copy_(best[f])


def clear(entries: dict) -> None:
    """Empty every slot in place (zeros, position -1), as ``empty`` builds them."""
    for f in ("k", "v", "score"):
        entries[f].zero_()
    entries["pos"].fill_(-1)


def innovation_scores(x, s_prev, pred_weight):
    """r_t = mean((x_t - s_{t-1} Wpred^T)^2): x, s_prev [B, T, D] -> [B, T]."""
    xhat = torch.zeros_like(x) if pred_weight is None else s_prev @ pred_weight.T
    return ((x - xhat) ** 2).mean(-1)


def chunk_layout(pos: int, T: int, C: int):
    """(first chunk index, front padding, number of chunks) of positions pos .. pos+T-1."""
    c0 = pos // C
    front = pos - c0 * C
    return c0, front, -(-(front + T) // C)


def to_chunks(a, front: int, n_chunks: int, C: int, dim: int, fill=0):
    """Pad ``a`` along ``dim`` (length T) to n_chunks * C and split that axis into
    [n_chunks, C]."""
    T = a.shape[dim]
    back = n_chunks * C - front - T
    shape = list(a.shape)
    parts = []
    if front:
        shape[dim] = front
        parts.append(torch.full(shape, fill, dtype=a.dtype, device=a.device))
    parts.append(a)
    if back:
        shape[dim] = back
        parts.append(torch.full(shape, fill, dtype=a.dtype, device=a.device))
    a = torch.cat(parts, dim=dim) if len(parts) > 1 else a
    d = dim % a.ndim
    return a.reshape(*a.shape[:d], n_chunks, C, *a.shape[d + 1:])


def parallel(tokens: dict, cand: dict, kept: dict, pos: int, chunk: int, select: int,
             capacity: int):
    """Stores seen by each chunk of a call, and the state after it.

    tokens: k, v [B, H, T, E], score [B, T] (ranked as constants), pos [B, T];
    cand, kept: the state's running candidates (``select``) and store (``capacity``).
    Returns (snapshots: k, v [B, H, nC, M, E], pos [B, nC, M]; first chunk index; front
    padding; new cand; new kept).
    """
    B, H, T, E = tokens["k"].shape
    C, K, M = chunk, select, capacity
    c0, front, nC = chunk_layout(pos, T, C)
    dt, dev = tokens["k"].dtype, tokens["k"].device
    ch = {
        "k": to_chunks(tokens["k"], front, nC, C, 2),  # [B, H, nC, C, E]
        "v": to_chunks(tokens["v"], front, nC, C, 2),
        "score": to_chunks(tokens["score"], front, nC, C, 1),  # [B, nC, C]
        "pos": to_chunks(tokens["pos"], front, nC, C, 1, fill=-1),
    }
    # The state's running candidates compete in the first chunk only.
    def chunk_axis(f):
        return 2 if f in ("k", "v") else 1

    rest = empty(B, H, K, E, dt, dev, (nC - 1,))
    lead = {f: torch.cat([cand[f].unsqueeze(chunk_axis(f)), rest[f]], dim=chunk_axis(f))
            for f in FIELDS}
    picks = top(concat(lead, ch), K)  # [.., nC, K]: per-chunk top-K, vectorised
    snaps = []
    n_done = (pos + T) // C - c0  # chunks of this call that end inside it
    for c in range(nC):
        snaps.append(kept)
        if c < n_done:
            pick = {f: (picks[f][:, :, c] if f in ("k", "v") else picks[f][:, c])
                    for f in FIELDS}
            kept = merge(kept, pick, M)
    if n_done == nC:
        new_cand = empty(B, H, K, E, dt, dev)
    else:
        new_cand = {f: (picks[f][:, :, -1] if f in ("k", "v") else picks[f][:, -1])
                    for f in FIELDS}
    snap = {
        "k": torch.stack([s["k"] for s in snaps], dim=2),
        "v": torch.stack([s["v"] for s in snaps], dim=2),
        "pos": torch.stack([s["pos"] for s in snaps], dim=1),
    }
    return snap, c0, front, new_cand, kept


def store_top(entries: dict, n: int, *, implementation="auto") -> dict:
    """The first n entries of an entry set (k, v [B, H, S, E]; score, pos [B, S]) in the
    store's total order: filled first, higher score first, later position first on ties."""
    if choose("store_top", implementation, entries["k"]) == "triton":
        from memcore.kernels.triton.eidetic_store import store_top as kernel

        return kernel(entries, n)
    return top(entries, n)


def store_merge(a: dict, b: dict, n: int, *, implementation="auto") -> dict:
    """The best n entries of the union of two entry sets (associative)."""
    if choose("store_merge", implementation, a["k"]) == "triton":
        from memcore.kernels.triton.eidetic_store import store_merge as kernel

        return kernel(a, b, n)
    return merge(a, b, n)


def select(tokens: dict, cand: dict, kept: dict, pos: int, chunk: int, select: int,
           capacity: int, *, implementation="auto"):
    """``parallel``'s results (snapshots, first chunk index, front padding, new candidates,
    new store) on the torch path or the Triton selection kernels (``tokens``' positions are
    pos .. pos+T-1, as the layer builds them)."""
    T = tokens["k"].shape[2]
    unserved = "an empty sequence (T = 0)" if T == 0 else None
    if choose("eidetic_store", implementation, tokens["k"], unserved) == "torch":
        return parallel(tokens, cand, kept, pos, chunk, select, capacity)
    from memcore.kernels.triton.eidetic_store import innovation_select

    snaps, kept, cand = innovation_select(tokens, pos, chunk, select, kept, cand)
    c0, front, nC = chunk_layout(pos, T, chunk)
    B, H, _, E = snaps["k"].shape
    snap = {"k": snaps["k"].reshape(B, H, nC, capacity, E),
            "v": snaps["v"].reshape(B, H, nC, capacity, E),
            "pos": snaps["pos"].reshape(B, nC, capacity)}
    return snap, c0, front, cand, kept


def store_partial(q, snap, c0: int, front: int, chunk: int, window: int, scale: float):
    """Partial softmax (m, l, acc) over [B, H, T] of the queries q [B, H, T, E] (at positions
    c0 * chunk + front ..) over the entries each query sees: its chunk's snapshot, entries at
    positions p <= t - window."""
    B, H, T, E = q.shape
    n_chunks = snap["k"].shape[2]
    qc = to_chunks(q, front, n_chunks, chunk, 2)  # [B, H, nC, C, E]
    sc = (qc @ snap["k"].transpose(-1, -2)) * scale  # [B, H, nC, C, M]
    tq = (c0 * chunk + torch.arange(n_chunks * chunk, device=q.device)).reshape(n_chunks, chunk)
    sp = snap["pos"][:, None, :, None, :]  # [B, 1, nC, 1, M]
    mask = (sp >= 0) & (sp <= tq[None, None, :, :, None] - window)
    m, l, acc = partial(sc, mask, snap["v"])
    n = n_chunks * chunk
    return (m.reshape(B, H, n, 1)[:, :, front:front + T],
            l.reshape(B, H, n, 1)[:, :, front:front + T],
            acc.reshape(B, H, n, E)[:, :, front:front + T])


def step(cand: dict, kept: dict, tok: dict, pos: int, chunk: int, select: int, capacity: int,
         inplace: bool = False):
    """One token joins the chunk's candidates; at a chunk's end the candidates merge into the
    store and the candidate slots empty. Returns (cand, kept): ``cand``'s and ``kept``'s own
    tensors, updated, with ``inplace``; else new tensors shared with neither."""
    chunk_end = (pos + 1) % chunk == 0
    if inplace:
        merge_into(cand, tok)
        if chunk_end:
            merge_into(kept, cand)
            clear(cand)
        return cand, kept
    cand = merge(cand, tok, select)
    if chunk_end:
        kept = merge(kept, cand, capacity)
        k = tok["k"]
        cand = empty(k.shape[0], k.shape[1], select, k.shape[-1], k.dtype, k.device)
    else:
        kept = {f: a.clone() for f, a in kept.items()}
    return cand, kept
