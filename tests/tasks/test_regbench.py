"""RegBench: automata, instances and metrics against their definitions; a tiny run."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from memcore import cli
from memcore.tasks import regbench as rb


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


def test_random_dfas_are_trimmed_minimal_and_within_bounds():
    rng = np.random.default_rng(0)
    for _ in range(60):
        d = rb.random_dfa(rng)
        assert 1 <= d.n_states <= 12
        assert _reachable(d.delta) == set(range(d.n_states))
        assert all(1 <= len(e) <= 3 for e in d.delta)
        assert all(0 <= c < rb.LETTERS for e in d.delta for c in e)
        letters = {c for e in d.delta for c in e}
        assert len(letters) <= 18
        for s in range(d.n_states):
            for t in range(s + 1, d.n_states):
                assert not _equivalent(d.delta, s, t), (d.delta, s, t)


def test_minimise_merges_equivalent_states():
    # states 1 and 2 both go to 3 on letter 5: equivalent; 3 has no edges
    delta = [{0: 1, 1: 2}, {5: 3}, {5: 3}, {}]
    assert rb._minimise(delta) == [{0: 1, 1: 1}, {5: 2}, {}]


def test_instances_are_accepted_and_shaped():
    rng = np.random.default_rng(1)
    d = rb.random_dfa(rng)
    tokens, words = rb.instance(rng, d)
    assert 10 <= len(words) <= 19
    assert all(1 <= len(w) <= 49 and d.accepts(w) for w in words)
    assert tokens.count(rb.SEP) == len(words) - 1
    missing = [c for c in range(rb.LETTERS) if c not in d.delta[0]]
    assert missing and not d.accepts(missing[:1])  # at most 3 of 18 letters leave a state


def test_encode_batch_labels_and_valid_letters():
    d = rb.DFA([{0: 1, 1: 2}, {2: 0}, {3: 2}])
    tok = [0, 2, 1, rb.SEP, 1, 3]  # "a c b | b d"
    x, y, valid = rb.encode_batch([(tok, d), (tok[:3], d)])
    assert x.shape == (2, 5) and list(x[1, 2:]) == [rb.PAD] * 3
    assert list(y[0]) == [2, 1, -100, 1, 3]
    assert list(y[1]) == [2, 1, -100, -100, -100]
    # states: after a -> 1 (allows c), after c -> 0 (a, b), after | -> 0, after b -> 2 (d)
    assert [set(np.flatnonzero(v)) for v in valid[0]] == [{2}, {0, 1}, set(), {0, 1}, {3}]


def test_metrics():
    valid = np.zeros((1, 2, rb.LETTERS), dtype=bool)
    valid[0, 0, [1, 2]] = True
    valid[0, 1, [4]] = True
    labels = np.array([[1, 4]])
    p = torch.zeros(1, 2, rb.VOCAB)
    p[0, 0, 1] = 1.0  # argmax valid; distribution (1, 0) vs (.5, .5): L1 = 1
    p[0, 1, 5] = 1.0  # argmax invalid; L1 = 2
    acc, tvd = rb.metrics(p, valid, labels)
    assert acc == pytest.approx(0.5) and tvd == pytest.approx(1.5)


def test_regbench_tiny_run(tmp_path, capsys):
    out = tmp_path / "rb"
    argv = ["regbench", "--steps", "2", "--batch", "2", "--train-dfas", "4", "--test-dfas", "3",
            "--max-string-len", "4", "--d-model", "16", "--models", "transformer", "mosaic",
            "--log-every", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    for r in res["models"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["tvd"] <= 2
    assert "TVD" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "regbench.png").stat().st_size > 0
    assert cli.main(["regbench", "--models", "lstm"]) == 2
    assert "unknown model" in capsys.readouterr().err
