"""Random deterministic automata for RegBench (``memcore.tasks.regbench``), drawn as seq_icl's
``RandomDFASampler`` does (berlino/seq_icl, ``src/dataloaders/dfa.py``).

Each state gets 1-3 outgoing edges with distinct letters, to distinct other states (no self-loop,
no two letters to one state). The automaton is then trimmed (states unreachable from the start
removed) and minimised; every state accepts, and a missing edge rejects. Minimisation may merge
two targets of one state, so the distinct-target property holds for the drawn transitions
(``sample_transitions``), not always for the minimal automaton. ``DFA.key`` numbers the states
in breadth-first order from the start (edges by letter), so that two automata of one language
have one key: the test, validation and training sets are disjoint by key.
"""

from __future__ import annotations

import numpy as np


class DFA:
    """A partial deterministic automaton: ``delta[state]`` maps letters to states; state 0
    starts; every state accepts (a missing edge rejects)."""

    def __init__(self, delta: list):
        self.delta = delta

    @property
    def n_states(self) -> int:
        return len(self.delta)

    @property
    def key(self) -> tuple:
        """The transitions as a hashable tuple (canonical numbering: equal languages, equal
        keys, once minimal)."""
        return tuple(tuple(sorted(d.items())) for d in self.delta)

    def accepts(self, letters) -> bool:
        s = 0
        for a in letters:
            if a not in self.delta[s]:
                return False
            s = self.delta[s][a]
        return True

    def walk(self, rng: np.random.Generator, length: int) -> list:
        """A word of ``length`` letters, each edge of the current state equally likely (the
        automaton as a probabilistic one)."""
        s, out = 0, []
        for _ in range(length):
            edges = sorted(self.delta[s].items())
            a, s = edges[rng.integers(len(edges))]
            out.append(a)
        return out


def sample_transitions(rng: np.random.Generator, n_states: int, letters,
                       edges=(1, 3)) -> list:
    """seq_icl's draw: for each state, ``edges[0]..edges[1]`` distinct letters of ``letters``,
    each to a distinct other state."""
    letters = np.asarray(letters)
    if n_states < 2 or edges[1] > min(len(letters), n_states - 1) or edges[0] < 1:
        raise ValueError(f"sample_transitions: need 1 <= edges <= letters and <= n_states - 1, "
                         f"got edges {edges}, {len(letters)} letters, {n_states} states")
    delta = []
    for s in range(n_states):
        k = int(rng.integers(edges[0], edges[1] + 1))
        syms = rng.choice(letters, size=k, replace=False)
        targets = rng.choice([t for t in range(n_states) if t != s], size=k, replace=False)
        delta.append({int(a): int(t) for a, t in zip(syms, targets, strict=True)})
    return delta


def canonical(delta: list) -> list:
    """The states reachable from 0, renumbered breadth first (edges in letter order)."""
    order, index = [0], {0: 0}
    for s in order:
        for _, t in sorted(delta[s].items()):
            if t not in index:
                index[t] = len(order)
                order.append(t)
    return [{a: index[t] for a, t in delta[s].items()} for s in order]


def minimise(delta: list) -> list:
    """Moore's partition refinement over the reachable states; all states accept, a missing
    edge goes to an implicit rejecting sink, so two states are equivalent when their edges agree
    class by class. Returned in ``canonical`` numbering."""
    delta = canonical(delta)
    cls = [0] * len(delta)
    while True:
        sigs = [tuple(sorted((a, cls[t]) for a, t in d.items())) for d in delta]
        keys: dict = {}
        new = [keys.setdefault((cls[s], sigs[s]), len(keys)) for s in range(len(delta))]
        if len(keys) == len(set(cls)):
            break
        cls = new
    merged: dict = {}
    for s, d in enumerate(delta):
        merged.setdefault(cls[s], {a: cls[t] for a, t in d.items()})
    classes = sorted(merged, key=lambda c: cls.index(c))  # the start's class first
    number = {c: i for i, c in enumerate(classes)}
    return canonical([{a: number[t] for a, t in merged[c].items()} for c in classes])


def random_dfa(rng: np.random.Generator, alphabet_size: int = 18, states=(4, 12),
               letters=(4, 18), edges=(1, 3)) -> DFA:
    """seq_icl's RegBench automaton: ``states`` and ``letters`` (inclusive ranges) drawn
    uniformly, the letters a subset of range(alphabet_size), the transitions by
    ``sample_transitions``, then trimmed and minimised."""
    n = int(rng.integers(states[0], states[1] + 1))
    k = int(rng.integers(letters[0], letters[1] + 1))
    chosen = rng.choice(alphabet_size, size=k, replace=False)
    return DFA(minimise(sample_transitions(rng, n, chosen, edges)))


def instance(rng: np.random.Generator, dfa: DFA, separator: int, strings=(10, 19),
             length=(1, 49)) -> tuple[list, list]:
    """Token ids of one instance, ``strings`` words of ``length`` letters (inclusive ranges)
    joined by ``separator``, and the words."""
    m = int(rng.integers(strings[0], strings[1] + 1))
    words = [dfa.walk(rng, int(rng.integers(length[0], length[1] + 1))) for _ in range(m)]
    tokens: list = []
    for i, w in enumerate(words):
        if i:
            tokens.append(separator)
        tokens.extend(w)
    return tokens, words


def distinct(draw, n: int, exclude: set, tries: int | None = None) -> list:
    """``n`` automata from successive ``draw()`` calls with distinct keys, none in ``exclude``
    (updated with theirs)."""
    out, budget = [], tries if tries is not None else 20 * n + 100
    while len(out) < n:
        if budget == 0:
            raise ValueError(f"cannot draw {n} distinct automata: too few distinct ones")
        budget -= 1
        d = draw()
        if d.key not in exclude:
            exclude.add(d.key)
            out.append(d)
    return out
