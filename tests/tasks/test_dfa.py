"""RegBench's automata against seq_icl's sampler: distinct letters and distinct targets per
state, no self-loop, trimmed and minimal, canonical keys."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcore.tasks import dfa


def _reachable(delta):
    seen, todo = {0}, [0]
    while todo:
        for t in delta[todo.pop()].values():
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def _equivalent(delta, a, b, depth=12):
    """Same accepted continuations up to ``depth`` letters (all states accept)."""
    frontier = [(a, b)]
    for _ in range(depth):
        nxt = []
        for s, t in frontier:
            if set(delta[s]) != set(delta[t]):
                return False
            nxt += [(delta[s][c], delta[t][c]) for c in delta[s]]
        frontier = list(set(nxt))
    return True


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(4, 12), st.integers(4, 18))
def test_sampled_transitions_go_to_distinct_other_states(seed, n, k):
    rng = np.random.default_rng(seed)
    letters = rng.choice(18, size=k, replace=False)
    delta = dfa.sample_transitions(rng, n, letters)
    assert len(delta) == n
    for s, edges in enumerate(delta):
        assert 1 <= len(edges) <= 3
        assert set(edges) <= set(int(a) for a in letters)  # distinct letters (dict keys)
        targets = list(edges.values())
        assert len(set(targets)) == len(targets)  # distinct targets, as seq_icl's choice
        assert s not in targets  # no self-loop


def test_sampler_refuses_impossible_draws():
    with pytest.raises(ValueError, match="sample_transitions"):
        dfa.sample_transitions(np.random.default_rng(0), 3, [0, 1, 2, 3])  # 3 edges, 2 others


def test_random_dfas_are_trimmed_minimal_and_canonical():
    rng = np.random.default_rng(0)
    for _ in range(60):
        d = dfa.random_dfa(rng)
        assert 1 <= d.n_states <= 12
        assert _reachable(d.delta) == set(range(d.n_states))
        assert all(1 <= len(e) <= 3 for e in d.delta)
        assert all(0 <= c < 18 for e in d.delta for c in e)
        for s in range(d.n_states):
            for t in range(s + 1, d.n_states):
                assert not _equivalent(d.delta, s, t), (d.delta, s, t)
        assert dfa.canonical(d.delta) == d.delta


def test_minimise_merges_equivalent_states_and_numbers_them_canonically():
    # states 1 and 2 both go to 3 on letter 5: equivalent; 3 has no edges; 4 is unreachable
    delta = [{0: 1, 1: 2}, {5: 3}, {5: 3}, {}, {2: 0}]
    assert dfa.minimise(delta) == [{0: 1, 1: 1}, {5: 2}, {}]
    # one language, two numberings: one key
    a = dfa.DFA(dfa.minimise([{0: 1, 1: 2}, {3: 0}, {4: 0}]))
    b = dfa.DFA(dfa.minimise([{0: 2, 1: 1}, {4: 0}, {3: 0}]))
    assert a.key == b.key


def test_distinct_draws_and_instances():
    rng = np.random.default_rng(1)
    seen: set = set()
    first = dfa.distinct(lambda: dfa.random_dfa(rng), 30, seen)
    second = dfa.distinct(lambda: dfa.random_dfa(rng), 30, seen)
    keys = [d.key for d in first + second]
    assert len(set(keys)) == 60 and set(keys) == seen
    with pytest.raises(ValueError, match="too few distinct"):
        dfa.distinct(lambda: first[0], 2, set())
    d = first[0]
    tokens, words = dfa.instance(rng, d, separator=18)
    assert 10 <= len(words) <= 19
    assert all(1 <= len(w) <= 49 and d.accepts(w) for w in words)
    assert tokens.count(18) == len(words) - 1
    missing = [c for c in range(18) if c not in d.delta[0]]
    assert missing and not d.accepts(missing[:1])
