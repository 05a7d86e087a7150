"""Byte-level language modelling on any text file, and length generalisation.

The file is split into training (the first 90%), validation (the next 5%) and test (the last
5%) bytes. Each model trains on random windows of L bytes of the training split (next-byte loss
at every position); every ``eval_every`` steps its loss on ``val_windows`` validation windows of
L bytes chooses the checkpoint, and the learning rate is chosen on the same loss (the protocol of
``memcore.tasks.protocol``). The chosen checkpoint is tested on ``eval_windows`` windows of 4L
bytes of the test split, spread evenly over it (without overlap where the split holds them):
the loss at every position, in buckets with standard errors over windows, shows whether a model
keeps improving with more context, stays flat, or breaks down past the training length.

Baselines on the same split and windows: 2-, 3- and 4-gram models of the training bytes
(``memcore.tasks.ngram``, Witten-Bell interpolation), each window read on its own.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from memcore import spec as S
from memcore.tasks import ngram, packing, plots, protocol, runs, sweep
from memcore.tasks.stack import task_model
from memcore.tasks.train import TrainConfig, check_backend

MODELS = ("transformer", "transformer_window", "mamba", "bmojo_f", "bmojo", "mosaic", "jamba")
DEFAULT_MODELS = MODELS[:-1]
VOCAB = 256  # bytes
SPLITS = (0.9, 0.95)  # training up to 90%, validation up to 95%, test after
NGRAMS = (2, 3, 4)
LRS = (1e-3, 2e-3, 4e-3)
SEEDS = (0, 1, 2)
MIN_WINDOWS = 100


@dataclass(frozen=True)
class LMConfig:
    """The models' sizes (``n_layers`` blocks), the training and the held-out evaluation
    (``eval_windows`` test windows of ``eval_factor`` * ``seq_len`` bytes, ``val_windows``
    validation windows of ``seq_len``; the loss per position in buckets of ``bucket``)."""

    seq_len: int = 128  # training length L; the test runs to 4L
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    d_state: int = 8
    window: int = 32
    chunk: int = 32
    select: int = 4
    capacity: int = 32
    batch_size: int = 16
    steps: int = 3000
    eval_every: int = 250
    eval_windows: int = 100
    val_windows: int = 100
    eval_factor: int = 4
    bucket: int = 16
    packed: bool = False  # training rows of whole documents with cu_seqlens (packing.py)

    def __post_init__(self):
        runs.check_counts("lm", self, ("seq_len", "d_model", "n_heads", "n_layers", "d_state",
                                       "window", "chunk", "select", "capacity", "batch_size",
                                       "steps", "eval_every", "eval_windows", "val_windows",
                                       "eval_factor", "bucket"))
        if self.seq_len < 2:
            raise ValueError(f"lm: seq_len must be >= 2, got {self.seq_len}")
        if not isinstance(self.packed, bool):
            raise ValueError(f"lm: packed must be a bool, got {self.packed!r}")

    @property
    def row_len(self) -> int:
        """A packed training row's bytes: the batch's, batch_size * seq_len."""
        return self.batch_size * self.seq_len

    @property
    def test_len(self) -> int:
        return self.eval_factor * self.seq_len


def lm_spec(name: str, cfg: LMConfig):
    """A byte-level model spec: ``n_layers`` blocks with an MLP (Memory Mosaics: persistent
    memory in its place)."""
    d, h = cfg.d_model, cfg.n_heads
    if name == "jamba":
        return S.jamba(d, h, pattern="MA", n_layers=cfg.n_layers, vocab_size=VOCAB,
                       d_state=cfg.d_state, ffn="mlp")
    layers = {
        "bmojo": lambda: S.bmojo(d, h, window=cfg.window, chunk=cfg.chunk, select=cfg.select,
                                 capacity=cfg.capacity, d_state=cfg.d_state),
        "bmojo_f": lambda: S.bmojo_f(d, h, window=cfg.window, d_state=cfg.d_state),
        "mamba": lambda: S.mamba(d, d_state=cfg.d_state),
        "transformer": lambda: S.transformer(d, h),
        "transformer_window": lambda: S.transformer(d, h, window=cfg.window),
        "mosaic": lambda: S.mosaic(d, h),
    }
    if name not in layers:
        raise ValueError(f"unknown model {name!r}; choose among {list(MODELS)}")
    ffn = "persistent" if name == "mosaic" else "mlp"
    return S.model([layers[name]() for _ in range(cfg.n_layers)], VOCAB, ffn=ffn)


def next_token_model(backend: str, spec, seed: int):
    """``spec``'s realization with ``memcore.init(spec, seed)``'s parameters behind the loop's
    interface (``memcore.tasks.stack.task_model``)."""
    return task_model(backend, spec, seed)


# -- data ----------------------------------------------------------------------------------------

def read_bytes(path: str) -> np.ndarray:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(f"--text: no such file: {path!r}")
    with open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8).astype(np.int64)


def split(data: np.ndarray, cfg: LMConfig) -> dict:
    """{"train", "val", "test"}: the file's three byte ranges."""
    a, b = (int(len(data) * f) for f in SPLITS)
    parts = {"train": data[:a], "val": data[a:b], "test": data[b:]}
    for name, need in (("train", cfg.seq_len + 2), ("val", cfg.seq_len + 1),
                       ("test", cfg.test_len + 1)):
        if len(parts[name]) < need:
            raise ValueError(f"--text: the {name} split holds {len(parts[name])} bytes; this "
                             f"configuration needs at least {need} ({len(data)} bytes in all)")
    return parts


def tiles(data: np.ndarray, n: int, length: int) -> tuple[np.ndarray, bool]:
    """``n`` windows of ``length`` bytes spread evenly over ``data`` (first and last bytes
    included), and whether they overlap (the split holds fewer than n disjoint ones)."""
    starts = np.linspace(0, len(data) - length, n).round().astype(np.int64) if n > 1 else \
        np.zeros(1, dtype=np.int64)
    return np.stack([data[s:s + length] for s in starts]), n * length > len(data)


def _windows(data: np.ndarray, n: int, length: int, rng: np.random.Generator):
    starts = rng.integers(0, len(data) - length, size=n)
    return np.stack([data[s:s + length] for s in starts])


# -- evaluation ----------------------------------------------------------------------------------

def nll_torch(model, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """-log p(x[:, i + 1] | x[:, :i + 1]) in nats, [W, T], for windows [W, T + 1]."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            xb = torch.as_tensor(windows[s:s + batch], device=dev)
            logits = model(xb[:, :-1]).float()
            out.append(torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), xb[:, 1:], reduction="none").double().cpu().numpy())
    return np.concatenate(out)


def nll_jax(model, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """``nll_torch`` for a JAX model realization."""
    from memcore.tasks.jax_stack import logits_at

    out = []
    for s in range(0, len(windows), batch):
        xb = windows[s:s + batch]
        logits = torch.from_numpy(np.array(logits_at(model, xb[:, :-1])))
        out.append(torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), torch.as_tensor(xb[:, 1:]),
            reduction="none").double().numpy())
    return np.concatenate(out)


def window_buckets(nll: np.ndarray, width: int) -> np.ndarray:
    """[W, n buckets]: each window's mean loss over positions [k width, (k + 1) width)."""
    return np.stack([nll[:, s:s + width].mean(1) for s in range(0, nll.shape[1], width)], 1)


def bucket_stats(per: np.ndarray, width: int, T: int) -> dict:
    """The loss in buckets of positions from ``window_buckets`` [W, n]: per bucket its
    positions [start, end), the mean over windows and its standard error over windows."""
    W = len(per)
    starts = list(range(0, T, width))
    se = per.std(0, ddof=1) / np.sqrt(W) if W > 1 else np.zeros(len(starts))
    return {"start": starts, "end": [min(s + width, T) for s in starts],
            "loss": per.mean(0).round(5).tolist(), "se": se.round(5).tolist()}


def held_out_numbers(nll: np.ndarray, cfg: LMConfig) -> dict:
    """One model's (or checkpoint's) test numbers from its losses [W, 4L]."""
    L = cfg.seq_len
    return {"loss_within_L": float(nll[:, :L].mean()), "loss_L_to_4L": float(nll[:, L:].mean()),
            "loss_by_position": nll.mean(0).round(5).tolist(),
            "window_buckets": window_buckets(nll, cfg.bucket).round(5).tolist()}


def held_out(text: str, cfg: LMConfig) -> tuple[dict, np.ndarray, np.ndarray, bool]:
    """(the splits, validation windows [val_windows, L + 1], test windows [eval_windows,
    4L + 1], whether the test windows overlap): the same for every model and seed."""
    parts = split(read_bytes(text), cfg)
    val, _ = tiles(parts["val"], cfg.val_windows, cfg.seq_len + 1)
    test, overlap = tiles(parts["test"], cfg.eval_windows, cfg.test_len + 1)
    return parts, val, test, overlap


def evaluator(val: np.ndarray, test: np.ndarray, cfg: LMConfig, backend: str, best: dict):
    """``evaluate(model) -> {"val": -validation loss, "test": test loss within L}`` (higher is
    better for the loop's selection); the test windows are read only when the validation loss
    is the run's best so far, and their numbers kept in ``best`` (the chosen checkpoint's)."""
    nll = nll_jax if backend == "jax" else nll_torch

    def evaluate(model):
        v = float(nll(model, val).mean())
        out = {"val": -v}
        if -v > best.get("val", -np.inf):
            best.update(held_out_numbers(nll(model, test), cfg), val=-v)
            out["test"] = best["loss_within_L"]
        return out
    return evaluate


def run_one(name: str, lr: float, seed: int, sub: str | None, cfg: LMConfig, text: str,
            device: str, backend: str, log_every: int, quiet: bool) -> dict:
    """Train ``name`` at ``lr`` and ``seed``; the validation loss of its best checkpoint and
    that checkpoint's test numbers."""
    parts, val, test, _ = held_out(text, cfg)
    train = parts["train"]

    def batches(step):
        w = _windows(train, cfg.batch_size, cfg.seq_len + 1, np.random.default_rng([seed, step]))
        return w[:, :-1], w[:, 1:]

    tcfg = TrainConfig(steps=cfg.steps, lr=lr, seed=seed, log_every=log_every,
                       warmup=min(100, cfg.steps // 10), min_lr_ratio=0.1,
                       eval_every=cfg.eval_every, out_dir=sub, device=device)
    options = {}
    if cfg.packed:
        batches = packing.packed_batches(packing.documents(train), cfg.row_len, seed)
        options["loss_fn"] = packing.packed_loss(tcfg.aux_weight)
    best: dict = {}
    _, res, params = runs.train_model(
        backend, next_token_model(backend, lm_spec(name, cfg), seed), batches, tcfg,
        eval_fn=evaluator(val, test, cfg, backend, best), name=name, quiet=quiet, **options)
    step, v, _ = protocol.best_evaluation(res["evals"])
    return {"lr": lr, "seed": seed, "val_loss": -v, "best_step": step,
            **{k: w for k, w in best.items() if k != "val"},
            "train_loss": float(np.mean(res["losses"][-10:])), "params": params,
            "seconds": round(res["seconds"], 1)}


def summarize(results: list, cfg: LMConfig) -> dict:
    """One model's line: the protocol's choice (the lowest mean validation loss), and at that
    rate the test numbers (mean +- std over seeds; the buckets' standard errors over the test
    windows, of the seeds' mean)."""
    sel = protocol.select(results, metric="loss_within_L", val="val_loss", maximize=False)
    at = [r for r in results if r["lr"] == sel["lr"]]
    line = dict(sel)
    for key in ("loss_L_to_4L", "train_loss", "best_step"):
        line[key], line[f"{key}_std"] = protocol.mean_std([r[key] for r in at])
    line["loss_by_position"] = np.mean([r["loss_by_position"] for r in at], 0).round(5).tolist()
    per = np.mean([r["window_buckets"] for r in at], 0)
    line["buckets"] = bucket_stats(per, cfg.bucket, cfg.test_len)
    line["params"] = at[0]["params"]
    line["seconds"] = round(sum(r["seconds"] for r in results), 1)
    line["runs"] = [{k: v for k, v in r.items() if k not in ("loss_by_position",
                                                             "window_buckets")}
                    for r in results]
    return line


def baselines(parts: dict, val: np.ndarray, test: np.ndarray, cfg: LMConfig) -> dict:
    """The n-gram models of the training split, on the same windows."""
    out = {}
    for n in NGRAMS:
        model = ngram.CorpusNGram(parts["train"], n, VOCAB)
        nums = held_out_numbers(model.nll(test), cfg)
        per = np.asarray(nums.pop("window_buckets"))
        out[f"{n}-gram"] = {"val_loss": float(model.nll(val).mean()), **nums,
                            "buckets": bucket_stats(per, cfg.bucket, cfg.test_len)}
    return out


PROTOCOL = LMConfig()


def config_record(cfg: LMConfig) -> dict:
    """The configuration as results.json records it; ``packed`` only when set, so that a run
    kept from before the option existed is still this configuration's."""
    out = asdict(cfg)
    if not cfg.packed:
        del out["packed"]
    return out


def deviations(cfg: LMConfig, lr_sweep: protocol.Sweep, overlap: bool) -> list[str]:
    """This run's departures from the task's protocol, from its configuration, after the ones
    every run has from the B'MOJO paper's length-generalisation test (Zancato et al. 2024:
    PG-19, training sequences up to 8K tokens, tested to four times that)."""
    out = [f"bytes of the given text instead of PG-19 tokens; training length {cfg.seq_len} "
           f"instead of 8K (the test to {cfg.eval_factor} times the training length kept)",
           f"{cfg.n_layers} blocks of width {cfg.d_model} instead of the paper's models of "
           f"up to 1.4B parameters"]
    if cfg.eval_windows < MIN_WINDOWS:
        out.append(f"{cfg.eval_windows} test windows instead of at least {MIN_WINDOWS}")
    if cfg.val_windows < MIN_WINDOWS:
        out.append(f"{cfg.val_windows} validation windows instead of at least {MIN_WINDOWS}")
    if overlap:
        out.append(f"the {cfg.eval_windows} test windows of {cfg.test_len + 1} bytes overlap "
                   f"(the test split holds fewer disjoint ones): their standard errors are "
                   f"too small")
    if cfg.steps < PROTOCOL.steps:
        out.append(f"{cfg.steps} training steps instead of {PROTOCOL.steps}")
    if cfg.packed:
        out.append(f"packed training rows: batch 1 of {cfg.row_len} bytes, whole documents of "
                   f"the training split (cut at blank lines; one longer than the row cut to it; "
                   f"the rest of a row that no document fits is unlabelled padding) with "
                   f"cu_seqlens, each document from the empty state and no loss across a "
                   f"boundary, instead of {cfg.batch_size} random windows of {cfg.seq_len} "
                   f"bytes; validation and test windows unchanged")
    return out + lr_sweep.deviations()


def run(text: str, models=DEFAULT_MODELS, cfg: LMConfig = PROTOCOL, lrs=LRS, seeds=SEEDS,
        device: str = "cpu", out_dir: str | None = None, backend: str = "torch",
        log_every: int = 50, quiet: bool = False, jobs: int = 1) -> dict:
    """Every (model, learning rate, seed) of the sweep and the n-gram baselines; results.json
    and the plot under ``out_dir``."""
    check_backend(backend)
    if cfg.packed and backend != "torch":
        raise ValueError(f"--packed needs --backend torch: the {backend} trainer has no packed "
                         f"loss yet (the JAX models take cu_seqlens, but rows holding different "
                         f"numbers of documents would each compile anew)")
    if cfg.packed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--packed trains on rows of batch 1: torchrun data parallel "
                         "(WORLD_SIZE > 1) would split no batch")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose among {list(MODELS)}")
    lr_sweep = protocol.Sweep(tuple(lrs), tuple(seeds))
    say = runs.say_unless(quiet)
    t0 = time.time()
    parts, val, test, overlap = held_out(text, cfg)
    results = {"text": os.path.abspath(text), "config": config_record(cfg), "backend": backend,
               "split_bytes": {k: len(v) for k, v in parts.items()},
               "sweep": {"lrs": list(lr_sweep.lrs), "seeds": list(lr_sweep.seeds)},
               "deviations": deviations(cfg, lr_sweep, overlap), "models": {},
               "baselines": baselines(parts, val, test, cfg)}
    say("memcore lm: deviations from the protocol and the paper's:")
    for dv in results["deviations"]:
        say(f"  - {dv}")
    four = results["baselines"]["4-gram"]["loss_within_L"]
    done = sweep.run_all("lm", run_one, models, lr_sweep,
                         {"task": config_record(cfg), "backend": backend,
                          "text": results["split_bytes"]},
                         (cfg, text, device, backend, log_every, quiet), out_dir, jobs, say,
                         lambda r: f"val {r['val_loss']:.4f} test <L {r['loss_within_L']:.4f} "
                                   f"L..4L {r['loss_L_to_4L']:.4f} (best step "
                                   f"{r['best_step']})")
    for name in models:
        results["models"][name] = r = summarize(done[name], cfg)
        r["beats_4gram"] = r["loss_within_L"] < four
        say(f"[{name}] lr {r['lr']:.1e}: held-out loss (nats/byte) < L {r['loss_within_L']:.3f}"
            f" +- {r['loss_within_L_std']:.3f}, L..4L {r['loss_L_to_4L']:.3f}; 4-gram {four:.3f}")
    return runs.finish(results, out_dir, t0, plots.loss_by_position, "lm.png")


def table(results: dict) -> str:
    rows = list(results["models"].items())
    base = [(n, {**r, "loss_within_L_std": 0.0, "lr": float("nan"), "params": 0})
            for n, r in results.get("baselines", {}).items()]
    return runs.table(
        f"{'model':<20} {'val':>7} {'<L':>7} {'+-std':>6} {'L..4L':>7} {'lr':>8} {'params':>9}",
        70, (f"{n:<20} {r['val_loss']:>7.3f} {r['loss_within_L']:>7.3f} "
             f"{r['loss_within_L_std']:>6.3f} {r['loss_L_to_4L']:>7.3f} {r['lr']:>8.1e} "
             f"{r['params']:>9,}" for n, r in rows + base))
