"""Eidetic store and innovation selection (DESIGN 2.4).

An entry set is a dict of arrays over an entry axis of length S:
``k``, ``v``: [B, H, S, E]; ``score``: [B, S]; ``pos``: [B, S] (int, < 0 marks an empty slot).

Total order, everywhere: a filled slot before an empty one; higher score first; on equal
score, the later position first. Positions of filled entries are distinct, so the order is
strict on them; empty slots are ordered by index so ranks stay a permutation.
"""

from __future__ import annotations

from ._xp import device

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
    si, sj = score[:, :, None], score[:, None, :]  # i: the entry ranked, j: a competitor
    pi, pj = pos[:, :, None], pos[:, None, :]
    fi, fj = filled[:, :, None], filled[:, None, :]
    idx = xp.arange(S, device=device(score))
    earlier_index = (idx[None, :] < idx[:, None])[None, :, :]
    both_filled = fi & fj
    beats = (
        (fj & ~fi)
        | (both_filled & ((sj > si) | ((sj == si) & (pj > pi))))
        | (~fi & ~fj & earlier_index)
    )
    return xp.sum(xp.astype(beats, xp.int64), axis=2)


def top(xp, entries: dict, n: int) -> dict:
    """The first ``n`` entries in the total order, in that order (empty slots fill the rest)."""
    r = ranks(xp, entries["score"], entries["pos"])  # [B, S]
    slot = xp.arange(n, dtype=xp.int64, device=device(r))
    onehot = slot[None, :, None] == r[:, None, :]  # [B, n, S]
    k_dtype = entries["k"].dtype
    sel = xp.astype(onehot, k_dtype)[:, None, :, :]  # [B, 1, n, S]
    zero_s = xp.zeros_like(entries["score"])[:, None, :]
    return {
        # A one-hot matmul keeps gradients flowing into the stored keys and values.
        "k": xp.matmul(sel, entries["k"]),
        "v": xp.matmul(sel, entries["v"]),
        "score": xp.sum(xp.where(onehot, entries["score"][:, None, :], zero_s), axis=2),
        "pos": xp.sum(xp.where(onehot, entries["pos"][:, None, :],
                               xp.zeros_like(entries["pos"])[:, None, :]), axis=2)
        - xp.astype(~xp.any(onehot, axis=2), xp.int64),
    }


def merge(xp, a: dict, b: dict, n: int) -> dict:
    """The best ``n`` of a union b. Associative, so chunk stores can be built by a scan."""
    return top(xp, concat(xp, a, b), n)


def innovation_scores(xp, x, s_prev, pred_weight):
    """r_t = mean((x_t - s_{t-1} Wpred^T)^2) over features. x, s_prev: [B, T, D] -> [B, T]."""
    if pred_weight is None:
        xhat = xp.zeros_like(x)
    else:
        xhat = xp.matmul(s_prev, xp.permute_dims(pred_weight, (1, 0)))
    return xp.mean((x - xhat) ** 2, axis=-1)
