"""The MQAR generator against Zoology's definition."""

import numpy as np
import pytest

from memcore.tasks import mqar


def _layout(inputs, labels, kv):
    """Recover (keys, values, query positions) from one example, by the definition."""
    ctx = 2 * kv
    keys, values = inputs[0:ctx:2], inputs[1:ctx:2]
    qpos = np.flatnonzero(labels != mqar.IGNORE)
    return keys, values, qpos


@pytest.mark.parametrize("V,L,kv", [(8192, 64, 4), (512, 128, 8), (40, 32, 8)])
def test_layout_and_labels(V, L, kv):
    x, y = mqar.generate(300, V, L, kv, seed=1)
    assert x.shape == y.shape == (300, L) and x.dtype == y.dtype == np.int64
    for xi, yi in zip(x, y, strict=True):
        keys, values, qpos = _layout(xi, yi, kv)
        assert len(set(keys.tolist())) == kv and len(set(values.tolist())) == kv
        assert keys.min() >= 1 and keys.max() < V // 2
        assert values.min() >= V // 2 and values.max() < V
        # one query per key, on even offsets after the context, at a key token
        assert len(qpos) == kv
        assert np.all(qpos >= 2 * kv) and np.all((qpos - 2 * kv) % 2 == 0)
        assert sorted(xi[qpos].tolist()) == sorted(keys.tolist())
        # the label at a query is the value paired with the key written there
        pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert [pair[k] for k in xi[qpos].tolist()] == yi[qpos].tolist()
        # the value never follows the query; filler is 0 (Figure-2 setting)
        rest = np.ones(L, bool)
        rest[:2 * kv] = False
        rest[qpos] = False
        assert np.all(xi[rest] == 0)


def test_random_filler_draws_from_whole_vocab():
    x, y = mqar.generate(200, 64, 32, 4, seed=2, random_non_queries=True)
    filler = np.ones_like(x, dtype=bool)
    filler[:, :8] = False
    filler[y != mqar.IGNORE] = False
    vals = x[filler]
    assert vals.min() >= 0 and vals.max() < 64
    assert len(np.unique(vals)) > 50  # uniform over [0, 64), not constant


def test_seed_reproducible_and_distinct():
    a = mqar.generate(10, 512, 64, 4, seed=5)
    b = mqar.generate(10, 512, 64, 4, seed=5)
    c = mqar.generate(10, 512, 64, 4, seed=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_gap_probabilities_power_law():
    p = mqar.gap_probabilities(56, 0.01)
    i = np.arange(1, 57)
    ref = 0.01 * i ** -0.99
    np.testing.assert_allclose(p, ref / ref.sum(), rtol=1e-12)


def test_query_placement_matches_successive_sampling():
    """Key j's gap is the j-th draw without replacement from p: the first draw has law p, the
    second has law sum_{i != g} p_i p_g / (1 - p_i)."""
    space, kv, n = 12, 3, 60_000
    rng = np.random.default_rng(0)
    gaps = mqar.sample_gaps(rng, n, kv, space)
    assert np.all(np.sort(gaps, 1)[:, 1:] != np.sort(gaps, 1)[:, :-1])  # without replacement
    p = mqar.gap_probabilities(space)
    second = np.array([sum(p[i] * p[g] / (1 - p[i]) for i in range(space) if i != g)
                       for g in range(space)])
    for draw, law in ((0, p), (1, second)):
        freq = np.bincount(gaps[:, draw], minlength=space) / n
        sd = np.sqrt(law * (1 - law) / n)
        assert np.all(np.abs(freq - law) < 5 * sd + 1e-12), (draw, freq, law)


def test_query_positions_from_generate_follow_power_law():
    V, L, kv, n = 512, 64, 2, 40_000
    x, y = mqar.generate(n, V, L, kv, seed=3)
    space = (L - 2 * kv) // 2
    # the first key's query slot is the first draw: law p
    first = np.array([np.flatnonzero(xi[2 * kv:] == xi[0])[0] // 2 for xi in x[:n]])
    p = mqar.gap_probabilities(space)
    freq = np.bincount(first, minlength=space) / n
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("V,L,kv,match", [
    (512, 63, 4, "even"),
    (64, 64, 4, "vocab_size must be > seq_len"),
    (512, 60, 16, "seq_len must be >= 4 \\* num_kv_pairs"),
    (512, 64, 0, "num_kv_pairs must be >= 1"),
])
def test_constraints(V, L, kv, match):
    with pytest.raises(ValueError, match=match):
        mqar.generate(2, V, L, kv)


def test_constraint_types():
    with pytest.raises(TypeError, match="seq_len must be an int"):
        mqar.generate(2, 512, 64.0, 4)


def test_accuracy_per_example_then_mean():
    labels = np.full((2, 6), mqar.IGNORE)
    labels[0, [1, 3]] = [5, 6]  # two labels, one right: 0.5
    labels[1, [2, 3, 4, 5]] = [1, 2, 3, 4]  # four labels, all right: 1.0
    pred = np.zeros((2, 6), dtype=np.int64)
    pred[0, [1, 3]] = [5, 0]
    pred[1, [2, 3, 4, 5]] = [1, 2, 3, 4]
    assert mqar.accuracy(pred, labels) == pytest.approx(0.75)  # not 5/6 (pooled)
    with pytest.raises(ValueError, match="must both be"):
        mqar.accuracy(pred[:, :5], labels)


def test_distinct_draws_are_uniform_ordered_subsets():
    n = 60_000
    r = mqar._distinct(np.random.default_rng(0), n, 2, 3, 7)  # ordered pairs from {3..6}
    assert r.min() >= 3 and r.max() < 7 and np.all(r[:, 0] != r[:, 1])
    pairs, counts = np.unique(r, axis=0, return_counts=True)
    assert len(pairs) == 12  # every ordered pair occurs
    p = 1 / 12
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_blocks_give_the_same_law_and_layout():
    x, y = mqar.generate(mqar.BLOCK + 5, 512, 32, 4, seed=0)
    assert x.shape == (mqar.BLOCK + 5, 32)
    assert np.all((y != mqar.IGNORE).sum(1) == 4)
    assert not np.array_equal(x[:5], x[mqar.BLOCK:])  # blocks continue one random stream
