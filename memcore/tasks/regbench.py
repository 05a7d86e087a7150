"""RegBench: in-context language learning (Akyurek, Wang, Kim, Andreas, ICML 2024).

Each instance is a random deterministic automaton with 4-12 states over 4-18 of 18 letters: every
state has 1-3 outgoing edges with distinct letters and no self-loop; the automaton is trimmed
(states unreachable from the start removed) and minimised; every state accepts. Walking it with
uniform transition probabilities (a probabilistic automaton) gives 10-19 strings of length
1-49, joined by the separator ``|``. A model sees one instance per sequence and must infer the
language in context: it is trained with next-token loss on every target that is a letter.

Metrics at every position whose target is a letter:
- accuracy: the model's argmax is a letter the automaton accepts from the current state;
- TVD: sum over the vocabulary of |p_model - p_automaton|, p_automaton uniform over the letters
  accepted from the current state (the reference code's sum, without a 1/2 factor).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from memcore import spec as S
from memcore.tasks import plots, runs
from memcore.tasks.lm import next_token_model
from memcore.tasks.mqar import IGNORE
from memcore.tasks.train import TrainConfig, check_backend

LETTERS = 18
SEP = 18  # "|"
PAD = 19  # "."
VOCAB = 20
MODELS = ("mosaic", "bmojo", "transformer", "mamba")


class DFA:
    """A partial deterministic automaton: ``delta[state]`` maps letters to states; state 0
    starts; every state accepts (a missing edge rejects)."""

    def __init__(self, delta: list):
        self.delta = delta

    @property
    def n_states(self) -> int:
        return len(self.delta)

    def accepts(self, letters) -> bool:
        s = 0
        for a in letters:
            if a not in self.delta[s]:
                return False
            s = self.delta[s][a]
        return True

    def states_along(self, letters) -> list:
        """The state before each letter (and after the last)."""
        s, out = 0, [0]
        for a in letters:
            s = self.delta[s][a]
            out.append(s)
        return out

    def walk(self, rng: np.random.Generator, length: int) -> list:
        s, out = 0, []
        for _ in range(length):
            edges = sorted(self.delta[s].items())
            a, s = edges[rng.integers(len(edges))]
            out.append(a)
        return out


def _trim(delta: list) -> list:
    seen, order = {0}, [0]
    for s in order:
        for t in delta[s].values():
            if t not in seen:
                seen.add(t)
                order.append(t)
    index = {s: i for i, s in enumerate(order)}
    return [{a: index[t] for a, t in delta[s].items()} for s in order]


def _minimise(delta: list) -> list:
    """Moore's partition refinement; all states accept, a missing edge goes to an implicit
    rejecting sink, so two states are equivalent when their edges agree class by class."""
    cls = [0] * len(delta)
    while True:
        sigs = [tuple(sorted((a, cls[t]) for a, t in d.items())) for d in delta]
        keys = {}
        new = [keys.setdefault((cls[s], sigs[s]), len(keys)) for s in range(len(delta))]
        if len(keys) == len(set(cls)):
            break
        cls = new
    # renumber so that the start state's class is 0 (classes in order of first state)
    first = {}
    for c in cls:
        first.setdefault(c, len(first))
    out = [dict() for _ in first]
    for s, d in enumerate(delta):
        out[first[cls[s]]] = {a: first[cls[t]] for a, t in d.items()}
    return out


def random_dfa(rng: np.random.Generator, states=(4, 12), alphabet=(4, 18)) -> DFA:
    n = int(rng.integers(states[0], states[1] + 1))
    k = int(rng.integers(alphabet[0], alphabet[1] + 1))
    letters = rng.choice(LETTERS, size=k, replace=False)
    delta = []
    for s in range(n):
        deg = int(rng.integers(1, 4))
        syms = rng.choice(letters, size=min(deg, k), replace=False)
        others = [t for t in range(n) if t != s]
        delta.append({int(a): int(others[rng.integers(len(others))]) for a in syms})
    return DFA(_minimise(_trim(delta)))


def instance(rng: np.random.Generator, dfa: DFA, strings=(10, 19), length=(1, 49)):
    """Token ids of one instance (strings joined by SEP) and the list of strings."""
    m = int(rng.integers(strings[0], strings[1] + 1))
    words = [dfa.walk(rng, int(rng.integers(length[0], length[1] + 1))) for _ in range(m)]
    tokens = []
    for i, w in enumerate(words):
        if i:
            tokens.append(SEP)
        tokens.extend(w)
    return tokens, words


def encode_batch(items):
    """Pad (tokens, dfa) items to one length: inputs, labels (letters only), and the valid-letter
    mask [B, T, LETTERS] of the state each prediction is made from."""
    T = max(len(t) for t, _ in items) - 1
    B = len(items)
    x = np.full((B, T), PAD, dtype=np.int64)
    y = np.full((B, T), IGNORE, dtype=np.int64)
    valid = np.zeros((B, T, LETTERS), dtype=bool)
    for b, (tok, dfa) in enumerate(items):
        n = len(tok) - 1
        x[b, :n] = tok[:-1]
        s = 0
        for t in range(n):
            a = tok[t]
            s = 0 if a == SEP else dfa.delta[s][a]
            nxt = tok[t + 1]
            if nxt != SEP:
                y[b, t] = nxt
                valid[b, t, list(dfa.delta[s])] = True
    return x, y, valid


def metrics(probs: torch.Tensor, valid: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, TVD) over the positions with a letter target. probs [B, T, V]."""
    m = labels != IGNORE
    p = probs[torch.as_tensor(m)].double().cpu().numpy()  # [n, V]
    v = valid[m]  # [n, LETTERS]
    q = np.zeros_like(p)
    q[:, :LETTERS] = v / v.sum(1, keepdims=True)
    arg = p.argmax(1)
    ok = (arg < LETTERS) & v[np.arange(len(arg)), np.minimum(arg, LETTERS - 1)]
    return float(ok.mean()), float(np.abs(p - q).sum(1).mean())


@dataclass(frozen=True)
class RegBenchConfig:
    """The automata (training and test sets, longest string), the models' sizes and the
    training."""

    train_dfas: int = 1000
    test_dfas: int = 100
    max_string_len: int = 49
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    d_state: int = 8
    window: int = 32
    batch_size: int = 16
    steps: int = 400
    lr: float = 1e-3

    def __post_init__(self):
        runs.check_counts("regbench", self, ("train_dfas", "test_dfas", "max_string_len",
                                             "d_model", "n_heads", "n_layers", "batch_size",
                                             "steps"))


def model_spec(name: str, cfg: RegBenchConfig):
    d, h = cfg.d_model, cfg.n_heads
    layers = {"mosaic": lambda: S.mosaic(d, h),
              "bmojo": lambda: S.bmojo(d, h, window=cfg.window, chunk=cfg.window, select=4,
                                       capacity=cfg.window, d_state=cfg.d_state),
              "transformer": lambda: S.transformer(d, h),
              "mamba": lambda: S.mamba(d, d_state=cfg.d_state)}
    if name not in layers:
        raise ValueError(f"unknown model {name!r}; choose among {list(MODELS)}")
    return S.model([layers[name]() for _ in range(cfg.n_layers)], VOCAB,
                   ffn="persistent" if name == "mosaic" else "mlp")


def make_data(cfg: RegBenchConfig, seed: int):
    """Disjoint training and test automata (a test automaton equal to a training one is
    redrawn), and one instance per training automaton (fixed, as the benchmark)."""
    rng = np.random.default_rng([seed, 7])
    seen, train_dfas, test_dfas = set(), [], []
    while len(train_dfas) < cfg.train_dfas:
        d = random_dfa(rng)
        seen.add(repr(d.delta))
        train_dfas.append(d)
    while len(test_dfas) < cfg.test_dfas:
        d = random_dfa(rng)
        if repr(d.delta) not in seen:
            test_dfas.append(d)
    lengths = (1, cfg.max_string_len)
    train_items = [(instance(rng, d, length=lengths)[0], d) for d in train_dfas]
    test_items = [(instance(rng, d, length=lengths)[0], d) for d in test_dfas]
    return train_items, test_items


TIME_BUCKET = 64  # --backend jax: batch lengths are rounded up to a multiple of this


@torch.no_grad()
def _probs_torch(model, x: np.ndarray) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.softmax(model(torch.as_tensor(x, device=dev)).float(), -1).cpu()


def _probs_jax(model, x: np.ndarray) -> torch.Tensor:
    from memcore.tasks.jax_stack import logits_at

    T = x.shape[1]
    xp = np.pad(x, ((0, 0), (0, -T % TIME_BUCKET)), constant_values=PAD)  # causal: exact
    return torch.softmax(torch.from_numpy(np.array(logits_at(model, xp)[:, :T])), -1)


def run(models, cfg: RegBenchConfig = RegBenchConfig(), seed: int = 0, device: str = "cpu",
        out_dir: str | None = None, backend: str = "torch", log_every: int = 50,
        quiet: bool = False) -> dict:
    check_backend(backend)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose among {list(MODELS)}")
    say = runs.say_unless(quiet)
    train_items, test_items = make_data(cfg, seed)
    results = {"config": asdict(cfg), "seed": seed, "backend": backend, "models": {}}
    t0 = time.time()
    for name in models:
        spec = model_spec(name, cfg)

        def batches(step):
            order = np.random.default_rng([seed, step]).permutation(len(train_items))
            x, y, _ = encode_batch([train_items[i] for i in order[:cfg.batch_size]])
            return x, y

        sub = os.path.join(out_dir, name) if out_dir else None
        tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=seed, log_every=log_every,
                           warmup=max(1, cfg.steps // 10), min_lr_ratio=0.1, out_dir=sub,
                           device=device)
        # --backend jax: batches vary in length, padded with PAD to a multiple of TIME_BUCKET
        # (unlabelled), so that few shapes compile.
        model, res, params = runs.train_model(
            backend, next_token_model(backend, spec, seed), batches, tcfg,
            {"jax": {"time_multiple": TIME_BUCKET, "pad_token": PAD}}, name=name, quiet=quiet)
        if backend == "jax":
            probs_of = _probs_jax
            results["time_bucket"] = TIME_BUCKET
        else:
            model.eval()
            probs_of = _probs_torch
        accs, tvds, ns = [], [], []
        for s in range(0, len(test_items), 8):
            x, y, valid = encode_batch(test_items[s:s + 8])
            a, t = metrics(probs_of(model, x), valid, y)
            n = int((y != IGNORE).sum())
            accs.append(a * n)
            tvds.append(t * n)
            ns.append(n)
        results["models"][name] = {"accuracy": sum(accs) / sum(ns), "tvd": sum(tvds) / sum(ns),
                                   "final_loss": res["losses"][-1],
                                   "params": params,
                                   "seconds": round(res["seconds"], 1)}
        r = results["models"][name]
        say(f"[{name}] accuracy {r['accuracy']:.3f}, TVD {r['tvd']:.3f}")
    return runs.finish(results, out_dir, t0, plots.regbench_bars, "regbench.png")


def table(results: dict) -> str:
    return runs.table(f"{'model':<12} {'accuracy':>8} {'TVD':>7} {'params':>9}", 40,
                      (f"{name:<12} {r['accuracy']:>8.3f} {r['tvd']:>7.3f} {r['params']:>9,}"
                       for name, r in results["models"].items()))
