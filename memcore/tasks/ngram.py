"""Count-based n-gram models with Witten-Bell interpolation (Witten and Bell, 1991): the lm
task's 2-, 3- and 4-gram baselines (counts over the training text) and RegBench's in-context
3-gram (counts over the sequence's own prefix, updated as it is read).

For a history h of the last k tokens (h' is h without its oldest token):

    P_k(w | h) = (c(h, w) + u(h) P_{k-1}(w | h')) / (c(h) + u(h))     where c(h) > 0
    P_k(w | h) = P_{k-1}(w | h')                                         where h was never seen

c(h, w) counts h followed by w, c(h) = sum_w c(h, w), u(h) is the number of distinct w seen after
h, and P_{-1} is uniform over the vocabulary. An order-n model uses k up to n - 1, or the
history there is when a sequence is shorter. Nothing is tuned.
"""

from __future__ import annotations

import numpy as np


def _check(order: int, vocab: int) -> None:
    for name, v in (("order", order), ("vocab", vocab)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"ngram: {name} must be an int >= 1, got {v!r}")


def _tokens(tokens, vocab: int, what: str) -> np.ndarray:
    a = np.asarray(tokens)
    if a.dtype.kind not in "iu":
        raise TypeError(f"ngram: {what} must hold integer token ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab):
        raise ValueError(f"ngram: {what} must lie in [0, {vocab}), got values from {a.min()} "
                         f"to {a.max()}")
    return a.astype(np.int64)


def _history_keys(x: np.ndarray, k: int, vocab: int) -> np.ndarray:
    """key[..., i] = sum_m x[..., i - m] vocab^m over m < k (the k tokens ending at i, the most
    recent in the lowest digit); positions i < k - 1 get -1 (not that much history)."""
    key = np.zeros(x.shape, dtype=np.int64)
    for m in range(k):
        key[..., m:] += x[..., :x.shape[-1] - m] * vocab ** m
    key[..., :k - 1] = -1
    return key


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values at ``query`` in the table of sorted ``keys`` (0 where absent)."""
    if not len(keys):
        return np.zeros(query.shape, dtype=values.dtype)
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[idx] == query, values[idx], 0)


class CorpusNGram:
    """An order-``order`` model over token ids [0, vocab), counted over ``tokens`` (a 1-d
    training text)."""

    def __init__(self, tokens, order: int, vocab: int):
        _check(order, vocab)
        if float(vocab) ** (order + 1) >= 2.0 ** 62:
            raise ValueError(f"ngram: vocab^(order+1) = {vocab}^{order + 1} does not fit the "
                             f"int64 keys")
        t = _tokens(tokens, vocab, "tokens")
        if t.ndim != 1:
            raise ValueError(f"ngram: tokens must be 1-d, got shape {t.shape}")
        self.order, self.vocab = int(order), int(vocab)
        self.tables = []
        for k in range(order):
            # pairs (the k tokens before j, token j) for j >= k
            hist = _history_keys(t[None, :-1], k, vocab)[0][k - 1:] if k else \
                np.zeros(len(t), dtype=np.int64)
            pair = hist * vocab + t[k:]
            pk, pc = np.unique(pair, return_counts=True)
            hk, first, hu = np.unique(pk // vocab, return_index=True, return_counts=True)
            hc = np.add.reduceat(pc, first) if len(pk) else pc
            self.tables.append((pk, pc, hk, hc, hu))

    def nll(self, windows) -> np.ndarray:
        """-log P(x[:, i + 1] | x[:, :i + 1]) in nats, [W, T], for windows [W, T + 1] (each
        window on its own: its first positions have less history)."""
        w = _tokens(windows, self.vocab, "windows")
        if w.ndim != 2 or w.shape[1] < 2:
            raise ValueError(f"ngram: windows must be [W, T + 1] with T >= 1, got {w.shape}")
        x, y = w[:, :-1], w[:, 1:]
        p = np.full(x.shape, 1.0 / self.vocab)
        for k, (pk, pc, hk, hc, hu) in enumerate(self.tables):
            hist = _history_keys(x, k, self.vocab) if k else np.zeros(x.shape, dtype=np.int64)
            c_h = np.where(hist >= 0, _lookup(hk, hc, hist), 0)
            u_h = _lookup(hk, hu, hist)
            c_hw = _lookup(pk, pc, hist * self.vocab + y)
            seen = c_h > 0
            p = np.where(seen, (c_hw + u_h * p) / np.maximum(c_h + u_h, 1), p)
        return -np.log(p)


def in_context(tokens, order: int, vocab: int) -> np.ndarray:
    """Next-token distributions [len(tokens) - 1, vocab] of the in-context model: at position i
    the counts are those of the prefix tokens[:i + 1]. Only targets below ``vocab`` are
    counted (a separator or pad at or above it is history, never a prediction); history
    tokens may be any int."""
    _check(order, vocab)
    t = [int(v) for v in np.asarray(tokens).reshape(-1)]
    counts: list[dict] = [{} for _ in range(order)]
    out = np.empty((max(len(t) - 1, 0), vocab))
    for i in range(len(t) - 1):
        if 0 <= t[i] < vocab:  # the pairs that end at i: target t[i] after k tokens
            for k in range(min(order, i + 1)):
                c = counts[k].setdefault(tuple(t[i - k:i]), np.zeros(vocab))
                c[t[i]] += 1
        p = np.full(vocab, 1.0 / vocab)
        for k in range(min(order - 1, i + 1) + 1):
            c = counts[k].get(tuple(t[i + 1 - k:i + 1]))
            if c is not None:
                u = np.count_nonzero(c)
                p = (c + u * p) / (c.sum() + u)
        out[i] = p
    return out
