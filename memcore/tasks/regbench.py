"""RegBench: in-context language learning (Akyurek, Wang, Kim, Andreas, ICML 2024; berlino/seq_icl),
with the model configurations of Memory Mosaics' ICLL experiment (facebookresearch/MemoryMosaics,
``ICLL/``).

Each instance is a random automaton (``memcore.tasks.dfa``: seq_icl's sampler, 4-12 states over
4-18 of 18 letters) walked with uniform transition probabilities: 10-19 strings of 1-49 letters
joined by the separator ``|``, one sequence per automaton. A model sees one instance per sequence
and must infer the language in context: it is trained with next-token loss on every target that
is a letter. The test, validation and training automata are disjoint (by minimal automaton) and
drawn in that order from one stream, so the test and validation sets do not change with the
number of training automata.

Metrics at every position whose target is a letter:
- accuracy: the model's argmax is a letter the automaton accepts from the current state;
- TVD: sum over the vocabulary of |p_model - p_automaton|, p_automaton uniform over the letters
  accepted from the current state (seq_icl's sum, without a 1/2 factor).

Models (2 blocks of width 128 unless changed): ``mosaic`` as ``ICLL/configs/experiment/dfa/mm.yaml``
(8 heads, persistent memory of 3.5 d = 448 slots, LayerNorm, logits / sqrt(d)); ``transformer`` as
seq_icl's ``transformer+.yaml`` (8 heads, rotary positions, a 4d MLP); ``mamba`` as its
``mamba.yaml`` (4 Mamba blocks, no MLP); ``bmojo`` (not in the paper) in the transformer's
block. Training as seq_icl's ``experiment/dfa/base.yaml``: AdamW, weight decay 0.1, batch 32, 200
epochs, warmup over 10% of them then cosine to 0.1 lr, gradients clipped at 1; the checkpoint of
each run is its best epoch on validation. ``in-context 3-gram`` (``memcore.tasks.ngram``) is the
baseline with no training.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from memcore import spec as S
from memcore.tasks import dfa as automata
from memcore.tasks import ngram, plots, protocol, runs, sweep
from memcore.tasks.lm import next_token_model
from memcore.tasks.mqar import IGNORE
from memcore.tasks.train import TrainConfig, check_backend

LETTERS = 18
SEP = 18  # "|"
PAD = 19  # "."
VOCAB = 20
MODELS = ("mosaic", "transformer", "mamba", "bmojo")
LRS = (2.5e-4, 5e-4, 1e-3)  # around seq_icl's and mm.yaml's 5e-4
SEEDS = (0, 1, 2)
TEST, VAL, TRAIN = 1, 2, 3  # the splits' instance streams
TIME_BUCKET = 64  # --backend jax: batch lengths are rounded up to a multiple of this


def instance(rng: np.random.Generator, dfa: automata.DFA, max_string_len: int = 49):
    """Token ids of one instance and its strings."""
    return automata.instance(rng, dfa, SEP, length=(1, max_string_len))


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


def metrics(probs, valid: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, TVD) over the positions with a letter target. probs [B, T, V]."""
    m = labels != IGNORE
    p = np.asarray(probs, dtype=np.float64)[m]  # [n, V]
    v = valid[m]  # [n, LETTERS]
    q = np.zeros_like(p)
    q[:, :LETTERS] = v / v.sum(1, keepdims=True)
    arg = p.argmax(1)
    ok = (arg < LETTERS) & v[np.arange(len(arg)), np.minimum(arg, LETTERS - 1)]
    return float(ok.mean()), float(np.abs(p - q).sum(1).mean())


@dataclass(frozen=True)
class RegBenchConfig:
    """The automata (test, validation and training sets; their stream ``data_seed``), the
    models' sizes and the training (``steps`` 0: ``epochs`` over the training set; evaluation
    on validation every ``eval_every`` steps, 0: every epoch)."""

    train_dfas: int = 1000
    val_dfas: int = 250
    test_dfas: int = 250
    max_string_len: int = 49
    data_seed: int = 0
    d_model: int = 128
    n_heads: int = 8
    n_layers: int = 2
    mamba_layers: int = 4
    d_state: int = 16
    window: int = 32  # bmojo: window, chunk and store capacity
    batch_size: int = 32
    epochs: int = 200
    steps: int = 0
    eval_every: int = 0
    weight_decay: float = 0.1

    def __post_init__(self):
        runs.check_counts("regbench", self, ("train_dfas", "val_dfas", "test_dfas",
                                             "max_string_len", "d_model", "n_heads", "n_layers",
                                             "mamba_layers", "d_state", "window", "batch_size",
                                             "epochs"))
        for name in ("steps", "eval_every", "data_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"regbench: {name} must be an int >= 0, got {v!r}")

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train_dfas // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps or self.epochs * self.steps_per_epoch

    @property
    def warmup(self) -> int:
        """seq_icl's warmup: ceil(epochs / 10) epochs (of the budget that runs)."""
        return min(self.total_steps // 10 or 1, self.steps_per_epoch * -(-self.epochs // 10))


PAPER = RegBenchConfig()


def model_spec(name: str, cfg: RegBenchConfig):
    d, h, n = cfg.d_model, cfg.n_heads, cfg.n_layers
    if name == "mosaic":
        return S.model([S.mosaic(d, h) for _ in range(n)], VOCAB, ffn="persistent",
                       norm="layer", logit_scale=1 / math.sqrt(d))
    if name == "mamba":
        return S.model([S.mamba(d, d_state=cfg.d_state) for _ in range(cfg.mamba_layers)],
                       VOCAB, ffn=None, norm="layer")
    if name == "transformer":
        return S.model([S.transformer(d, h) for _ in range(n)], VOCAB, norm="layer")
    if name == "bmojo":
        w = cfg.window
        return S.model([S.bmojo(d, h, window=w, chunk=w, select=4, capacity=w,
                                d_state=cfg.d_state) for _ in range(n)], VOCAB, norm="layer")
    raise ValueError(f"unknown model {name!r}; choose among {list(MODELS)}")


@functools.lru_cache(maxsize=2)
def make_data(cfg: RegBenchConfig) -> dict:
    """{"test", "val", "train"}: (tokens, automaton) per automaton, the automata distinct across
    and within the sets, the same for every model and seed (made once per configuration in a
    process; read only)."""
    rng = np.random.default_rng([cfg.data_seed, 7])
    seen: set = set()
    out = {}
    for split, n, stream in (("test", cfg.test_dfas, TEST), ("val", cfg.val_dfas, VAL),
                             ("train", cfg.train_dfas, TRAIN)):
        dfas = automata.distinct(lambda: automata.random_dfa(rng, LETTERS), n, seen)
        out[split] = [(instance(np.random.default_rng([cfg.data_seed, stream, i]), d,
                                cfg.max_string_len)[0], d) for i, d in enumerate(dfas)]
    return out


def _probs_torch(model, x: np.ndarray) -> np.ndarray:
    dev = next(model.parameters()).device
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(x, device=dev)).float(), -1).cpu().numpy()


def _probs_jax(model, x: np.ndarray) -> np.ndarray:
    from memcore.tasks.jax_stack import logits_at

    T = x.shape[1]
    xp = np.pad(x, ((0, 0), (0, -T % TIME_BUCKET)), constant_values=PAD)  # causal: exact
    logits = torch.from_numpy(np.array(logits_at(model, xp)[:, :T]))
    return torch.softmax(logits, -1).numpy()


def score(items, probs_of, batch: int = 32) -> tuple[float, float]:
    """(accuracy, TVD) over ``items``, weighted by letter targets; ``probs_of(x)`` [B, T, V]."""
    acc = tvd = n = 0.0
    for s in range(0, len(items), batch):
        x, y, valid = encode_batch(items[s:s + batch])
        a, t = metrics(probs_of(x), valid, y)
        k = int((y != IGNORE).sum())
        acc, tvd, n = acc + a * k, tvd + t * k, n + k
    return acc / n, tvd / n


def in_context_ngram(items, order: int = 3) -> tuple[float, float]:
    """(accuracy, TVD) of the in-context n-gram: each instance's own prefix counts."""
    def probs_of(x):
        p = np.zeros(x.shape + (VOCAB,))
        for b, row in enumerate(x):
            n = int((row != PAD).sum())  # the inputs; one slot after them for the last target
            p[b, :n, :LETTERS] = ngram.in_context(np.append(row[:n], PAD), order, LETTERS)
        return p
    return score(items, probs_of)


def evaluator(data: dict, backend: str):
    """``evaluate(model) -> {"val": accuracy, "val_tvd", "test", "test_tvd"}``; the test set is
    scored only when the validation accuracy is the run's best so far (the checkpoint the
    protocol keeps), and chooses nothing. After a resume the first evaluation scores the test
    set too (the best so far is in the loop's history, not here); the choice is the same."""
    best = [-np.inf]

    def evaluate(model):
        if backend == "jax":
            probs_of = lambda x: _probs_jax(model, x)  # noqa: E731
        else:
            probs_of = lambda x: _probs_torch(model, x)  # noqa: E731
        acc, tvd = score(data["val"], probs_of)
        out = {"val": acc, "val_tvd": tvd}
        if acc > best[0]:
            best[0] = acc
            out["test"], out["test_tvd"] = score(data["test"], probs_of)
        return out
    return evaluate


def run_one(name: str, lr: float, seed: int, sub: str | None, cfg: RegBenchConfig,
            device: str, backend: str, log_every: int, quiet: bool) -> dict:
    """Train ``name`` at ``lr`` and ``seed``; the validation accuracy of its best epoch and the
    test accuracy and TVD of that checkpoint."""
    data = make_data(cfg)
    train = data["train"]

    def batches(step):  # a fresh shuffle every epoch, a pure function of (seed, step)
        epoch, i = divmod(step, cfg.steps_per_epoch)
        order = np.random.default_rng([seed, 3, epoch]).permutation(len(train))
        x, y, _ = encode_batch([train[j] for j in order[i * cfg.batch_size:
                                                          (i + 1) * cfg.batch_size]])
        return x, y

    every = cfg.eval_every or cfg.steps_per_epoch  # a checkpoint at every evaluation
    checkpoints, resume = sweep.checkpointing(sub, every)
    tcfg = TrainConfig(steps=cfg.total_steps, lr=lr, weight_decay=cfg.weight_decay, seed=seed,
                       warmup=cfg.warmup, min_lr_ratio=0.1, grad_clip=1.0, log_every=log_every,
                       eval_every=every, out_dir=sub, device=device, **checkpoints)
    # --backend jax: batches vary in length, padded with PAD to a multiple of TIME_BUCKET
    # (unlabelled), so that few shapes compile.
    _, res, params = runs.train_model(
        backend, next_token_model(backend, model_spec(name, cfg), seed), batches, tcfg,
        {"jax": {"time_multiple": TIME_BUCKET, "pad_token": PAD}},
        eval_fn=evaluator(data, backend), resume=resume, name=name, quiet=quiet)
    step, val, extras = protocol.best_evaluation(res["evals"])
    return {"lr": lr, "seed": seed, "val_accuracy": val, "accuracy": extras["test"],
            "tvd": extras["test_tvd"], "val_tvd": extras["val_tvd"], "best_step": step,
            "steps": res["steps"], "final_loss": res["losses"][-1], "params": params,
            "seconds": round(res["seconds"], 1)}


def summarize(results: list) -> dict:
    """One model's line: the protocol's choice (the best mean validation accuracy) and, at
    that rate, the test accuracy and TVD (mean +- std over seeds)."""
    sel = protocol.select(results)
    at = [r for r in results if r["lr"] == sel["lr"]]
    line = dict(sel)
    for key in ("tvd", "val_tvd", "final_loss", "best_step"):
        line[key], line[f"{key}_std"] = protocol.mean_std([r[key] for r in at])
    return {**line, "params": at[0]["params"], "steps": at[0]["steps"],
            "seconds": round(sum(r["seconds"] for r in results), 1), "runs": results}


def deviations(cfg: RegBenchConfig, lr_sweep: protocol.Sweep, models) -> list[str]:
    """This run's departures from seq_icl's and the ICLL experiment's protocol."""
    p, out = PAPER, []
    if cfg.total_steps < PAPER.epochs * cfg.steps_per_epoch:
        out.append(f"{cfg.total_steps} training steps of batch {cfg.batch_size} "
                   f"({cfg.total_steps / cfg.steps_per_epoch:.1f} epochs) instead of "
                   f"{PAPER.epochs} epochs")
    for name, what in (("d_model", "width"), ("n_heads", "heads"), ("n_layers", "blocks"),
                       ("mamba_layers", "Mamba blocks"), ("d_state", "SSM state size"),
                       ("batch_size", "batch"), ("max_string_len", "longest string"),
                       ("weight_decay", "weight decay")):
        if getattr(cfg, name) != getattr(p, name):
            out.append(f"{what} {getattr(cfg, name)} instead of {getattr(p, name)}")
    if (cfg.val_dfas, cfg.test_dfas) != (p.val_dfas, p.test_dfas):
        out.append(f"{cfg.val_dfas} validation and {cfg.test_dfas} test automata instead of "
                   f"{p.val_dfas} and {p.test_dfas}")
    out.append("no dropout (mm.yaml: 0.05 on attention and outputs; seq_icl's baselines: 0.1 "
               "on embeddings)")
    if "transformer" in models:
        out.append("transformer with rotary positions (seq_icl's transformer+.yaml); its "
                   "transformer.yaml learns absolute position embeddings, which memcore has not")
    if "bmojo" in models:
        out.append("bmojo is memcore's addition (not in the paper's figure)")
    out += lr_sweep.deviations()
    out.append("best epoch chosen on the validation accuracy of the automaton (seq_icl monitors "
               "the validation next-token accuracy)")
    return out


def budget(cfg: RegBenchConfig, train) -> dict:
    """A run's training budget: steps, epochs and tokens read (about), against the paper's."""
    per_epoch = sum(len(t) - 1 for t, _ in train)
    epochs = cfg.total_steps / cfg.steps_per_epoch
    return {"steps": cfg.total_steps, "epochs": round(epochs, 2),
            "tokens": round(epochs * per_epoch), "paper_tokens": PAPER.epochs * per_epoch}


def run(models, cfg: RegBenchConfig = PAPER, lrs=LRS, seeds=SEEDS, device: str = "cpu",
        out_dir: str | None = None, backend: str = "torch", log_every: int = 50,
        quiet: bool = False, jobs: int = 1) -> dict:
    """Every (model, learning rate, seed) of the sweep and the in-context 3-gram; results.json
    and the plot under ``out_dir``."""
    check_backend(backend)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose among {list(MODELS)}")
    lr_sweep = protocol.Sweep(tuple(lrs), tuple(seeds))
    say = runs.say_unless(quiet)
    t0 = time.time()
    data = make_data(cfg)
    results = {"config": asdict(cfg), "backend": backend,
               "sweep": {"lrs": list(lr_sweep.lrs), "seeds": list(lr_sweep.seeds)},
               "deviations": deviations(cfg, lr_sweep, models),
               "budget": budget(cfg, data["train"]),
               "models": {}, "baselines": {}}
    if backend == "jax":
        results["time_bucket"] = TIME_BUCKET
    say("memcore regbench: deviations from the paper's protocol:")
    for dv in results["deviations"]:
        say(f"  - {dv}")
    (va, vt), (ta, tt) = (in_context_ngram(data[k]) for k in ("val", "test"))
    results["baselines"]["in-context 3-gram"] = {"accuracy": ta, "tvd": tt, "val_accuracy": va,
                                                 "val_tvd": vt}
    say(f"[in-context 3-gram] accuracy {ta:.3f}, TVD {tt:.3f}")
    done = sweep.run_all("regbench", run_one, models, lr_sweep,
                         {"task": asdict(cfg), "backend": backend},
                         (cfg, device, backend, log_every, quiet), out_dir, jobs, say,
                         lambda r: f"val {r['val_accuracy']:.4f} test {r['accuracy']:.4f} "
                                   f"TVD {r['tvd']:.3f} (best step {r['best_step']})")
    for name in models:
        results["models"][name] = r = summarize(done[name])
        say(f"[{name}] lr {r['lr']:.1e}: accuracy {r['accuracy']:.3f} +- "
            f"{r['accuracy_std']:.3f}, TVD {r['tvd']:.3f} +- {r['tvd_std']:.3f}")
    return runs.finish(results, out_dir, t0, plots.regbench_bars, "regbench.png")


def table(results: dict) -> str:
    rows = [(n, r) for n, r in results["models"].items()]
    base = [(n, {**r, "accuracy_std": 0.0, "tvd_std": 0.0, "lr": float("nan"), "params": 0})
            for n, r in results.get("baselines", {}).items()]
    return runs.table(
        f"{'model':<18} {'accuracy':>8} {'+-std':>6} {'TVD':>6} {'+-std':>6} {'val':>6} "
        f"{'lr':>8} {'params':>9}", 75,
        (f"{n:<18} {r['accuracy']:>8.3f} {r['accuracy_std']:>6.3f} {r['tvd']:>6.3f} "
         f"{r['tvd_std']:>6.3f} {r['val_accuracy']:>6.3f} {r['lr']:>8.1e} {r['params']:>9,}"
         for n, r in rows + base))
