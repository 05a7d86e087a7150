"""Multi-query associative recall (MQAR), the Zoology protocol (Arora et al. 2023).

A sequence starts with ``kv`` key-value pairs ``k1 v1 k2 v2 ...``: keys drawn without
replacement from ``[1, V/2)``, values from ``[V/2, V)``. The rest of the sequence holds
``space = (L - 2 kv) / 2`` two-token slots; each key is written again once, at the first
token of a slot whose offset ``g`` is drawn without replacement with ``p(g) ∝ a (g+1)^(a-1)``
(a = 0.01: about 1/g, most queries land early). The model must predict the key's value at the
position of the repeated key; every other label is -100. Filler tokens are 0, or uniform in
``[0, V)`` with ``random_non_queries``.

Accuracy: argmax at the labelled positions, averaged per example, then over examples.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100
POWER_A = 0.01
BLOCK = 2048  # examples generated at a time


def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"mqar: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"mqar: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_config(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    """Zoology's constraints, as clear errors: L even, V > L, 4 kv <= L."""
    V = _int("vocab_size", vocab_size, 4)
    L = _int("seq_len", seq_len, 2)
    kv = _int("num_kv_pairs", num_kv_pairs, 1)
    if L % 2:
        raise ValueError(f"mqar: seq_len must be even (two-token slots), got {L}")
    if V <= L:
        raise ValueError(f"mqar: vocab_size must be > seq_len, got vocab_size={V}, seq_len={L}")
    if 4 * kv > L:
        raise ValueError(f"mqar: seq_len must be >= 4 * num_kv_pairs = {4 * kv} (kv pairs plus "
                         f"one query slot per key), got seq_len={L}, num_kv_pairs={kv}")
    if kv > V // 2 - 1:
        raise ValueError(f"mqar: num_kv_pairs must be <= vocab_size // 2 - 1 = {V // 2 - 1} "
                         f"distinct keys, got {kv}")


def gap_probabilities(space: int, power_a: float = POWER_A) -> np.ndarray:
    """p(g) for slot offsets g = 0 .. space-1: ``a (g+1)^(a-1)``, normalised."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _distinct(rng: np.random.Generator, n: int, k: int, lo: int, hi: int) -> np.ndarray:
    """n rows of k distinct ints from [lo, hi), each row a uniform draw without replacement,
    in random order."""
    # The k smallest of iid uniform keys form a uniform k-subset, and sorting them by key
    # orders it uniformly at random; argpartition keeps this linear in hi - lo.
    r = rng.random((n, hi - lo))
    idx = np.argpartition(r, k - 1, axis=1)[:, :k] if k < hi - lo else \
        np.broadcast_to(np.arange(hi - lo), (n, hi - lo))
    order = np.argsort(np.take_along_axis(r, idx, axis=1), axis=1)
    return lo + np.take_along_axis(idx, order, axis=1)


def sample_gaps(rng: np.random.Generator, n: int, kv: int, space: int,
                power_a: float = POWER_A) -> np.ndarray:
    """[n, kv] slot offsets, sampled without replacement with probabilities p, in draw order.

    Gumbel top-k: sorting log p + Gumbel noise gives exactly successive sampling without
    replacement (numpy's ``choice(replace=False, p=p)``), vectorised over examples.
    """
    logp = np.log(gap_probabilities(space, power_a))
    scores = logp[None, :] + rng.gumbel(size=(n, space))
    return np.argsort(-scores, axis=1)[:, :kv]


def generate(n: int, vocab_size: int, seq_len: int, num_kv_pairs: int, seed=0,
             power_a: float = POWER_A, random_non_queries: bool = False):
    """``n`` MQAR examples: (inputs [n, L] int64, labels [n, L] int64 with -100 unlabelled).

    ``seed`` is an int or a ``numpy.random.Generator`` (fresh samples per training step draw
    from one generator).
    """
    check_config(vocab_size, seq_len, num_kv_pairs)
    n = _int("n", n, 1)
    if not isinstance(power_a, (int, float)) or not power_a > 0:
        raise ValueError(f"mqar: power_a must be a float > 0, got {power_a!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if n > BLOCK:  # bounded memory for large sets (100k examples x 4096 candidate keys)
        parts = [generate(min(BLOCK, n - s), vocab_size, seq_len, num_kv_pairs, rng, power_a,
                          random_non_queries) for s in range(0, n, BLOCK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    V, L, kv = vocab_size, seq_len, num_kv_pairs
    half = V // 2
    keys = _distinct(rng, n, kv, 1, half)
    values = _distinct(rng, n, kv, half, V)
    ctx = 2 * kv
    space = (L - ctx) // 2
    gaps = sample_gaps(rng, n, kv, space, power_a)
    inputs = np.zeros((n, L), dtype=np.int64)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    qpos = ctx + 2 * gaps  # the repeated key; its value is predicted there
    rows = np.arange(n)[:, None]
    inputs[rows, qpos] = keys
    labels = np.full((n, L), IGNORE, dtype=np.int64)
    labels[rows, qpos] = values
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, V, size=int(filler.sum()))
    return inputs, labels


def accuracy(predictions, labels) -> float:
    """Exact-match accuracy at labelled positions (label != -100), averaged per example, then
    over the examples that have a label. Accepts numpy arrays or torch tensors [n, L]."""
    pred = np.asarray(predictions.detach().cpu() if hasattr(predictions, "detach")
                      else predictions)
    lab = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if pred.shape != lab.shape or pred.ndim != 2:
        raise ValueError(f"accuracy: predictions and labels must both be [n, L], got "
                         f"{pred.shape} and {lab.shape}")
    mask = lab != IGNORE
    count = mask.sum(1)
    keep = count > 0
    if not keep.any():
        raise ValueError("accuracy: labels hold no labelled position (all -100)")
    per = ((pred == lab) & mask).sum(1)[keep] / count[keep]
    return float(per.mean())
