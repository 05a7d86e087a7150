"""MQAR experiments: the models compared, the quick configuration, Zoology's Figure-2 sweep,
and the results file.

Every model has 2 mixer layers and no MLP (Zoology). The quick configuration departs from
Zoology's protocol in ways listed in ``QUICK_DEVIATIONS``; they are printed and recorded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from memcore import spec as S
from memcore.tasks import mqar, plots, runs
from memcore.tasks.stack import TaskLM
from memcore.tasks.train import CHECKPOINT, TrainConfig, check_backend

MODELS = ("bmojo", "mamba", "transformer", "transformer_window", "bmojo_f", "mosaic", "jamba")


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR run: the data (Zoology's generator), the 2-layer model and its training
    (``steps`` 0: ``epochs`` passes over ``train_examples``)."""

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    d_model: int = 64
    n_heads: int = 1
    d_state: int = 16
    window: int = 8  # bmojo's raw window; also transformer_window's
    chunk: int = 16  # bmojo store: chunk length, tokens kept per chunk, capacity
    select: int = 8
    capacity: int = 32
    short_conv: int = 0  # width of the causal depthwise conv before each mixer (0: none)
    batch_size: int = 512
    steps: int = 0  # 0: epochs * train_examples / batch_size
    epochs: int = 64
    train_examples: int = 100_000  # 0: fresh samples every step
    test_examples: int = 3_000
    lr: float = 1e-3
    weight_decay: float = 0.1
    aux_weight: float = 0.1
    early_stop: float = 0.99
    eval_every: int = 0
    random_non_queries: bool = False

    def __post_init__(self):
        mqar.check_config(self.vocab_size, self.seq_len, self.num_kv_pairs)

    @property
    def total_steps(self) -> int:
        if self.steps:
            return self.steps
        if not self.train_examples:
            raise ValueError("MQARConfig: with fresh samples (train_examples=0) give steps")
        return self.epochs * -(-self.train_examples // self.batch_size)


# L=64, kv=4: the keys sit at positions 0..7 and the median query slot offset is about 4, so
# most queries come 9 or more tokens after their pair; a raw window of 4 misses them (recall then
# needs the store or the fading memory). The store's first chunk is exactly the 8 context tokens.
QUICK = MQARConfig(vocab_size=512, seq_len=64, num_kv_pairs=4, d_model=64, n_heads=1,
                   d_state=4, window=4, chunk=8, select=8, capacity=16, short_conv=3,
                   batch_size=32, steps=800, train_examples=0, test_examples=256, lr=3e-3,
                   eval_every=50, early_stop=0.99)

QUICK_DEVIATIONS = [
    "vocab 512 instead of 8192 (keys [1,256), values [256,512))",
    "one point of the sweep, (L, kv) = (64, 4) with d_model 64, one learning rate 3e-3 "
    "(no sweep)",
    "fresh samples every step instead of a fixed 100k training set; batch 32; at most 800 "
    "steps with cosine decay instead of 64 epochs (early stop above 0.99 checked every 50 "
    "steps); 256 test examples",
    "a causal depthwise convolution of width 3 before each mixer (as the Based paper's "
    "short-conv hybrids), for every model",
    "attention uses rotary positions (memcore's default) instead of learned absolute ones; "
    "no dropout",
    "mamba d_state 4 instead of 16 (CPU time); grad-norm clipping at 1.0; bmojo innovation "
    "loss weight 0.1",
]

# Zoology's Figure 2 (iclr24_zoology_figure2/configs.py): (L, kv, batch), widths and LRs.
FULL_GRID = [(64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)]
FULL_WIDTHS = (64, 128, 256, 512)
FULL_LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))


def model_spec(name: str, cfg: MQARConfig):
    """The 2-layer, MLP-free model spec for ``name``."""
    d, h, V = cfg.d_model, cfg.n_heads, cfg.vocab_size
    if name == "bmojo":
        layer = S.bmojo(d, h, window=cfg.window, chunk=cfg.chunk, select=cfg.select,
                        capacity=cfg.capacity, d_state=cfg.d_state)
    elif name == "bmojo_f":
        layer = S.bmojo_f(d, h, window=cfg.window, d_state=cfg.d_state)
    elif name == "mamba":
        layer = S.mamba(d, d_state=cfg.d_state)
    elif name == "transformer":
        layer = S.transformer(d, h)
    elif name == "transformer_window":
        layer = S.transformer(d, h, window=cfg.window)
    elif name == "mosaic":
        layer = S.mosaic(d, h)
    elif name == "jamba":
        return S.jamba(d, h, pattern="MA", n_layers=2, vocab_size=V, d_state=cfg.d_state,
                       ffn=None)
    else:
        raise ValueError(f"unknown model {name!r}; choose among {list(MODELS)}")
    return S.model([layer, layer], V, ffn=None)


def check_models(names) -> list:
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose among {list(MODELS)}")
    return list(names)


def _batches(cfg: MQARConfig, seed: int):
    """batch_fn(step): a pure function of (seed, step), so that resume replays the data."""
    if not cfg.train_examples:
        def fresh(step):
            rng = np.random.default_rng([seed, 1, step])
            return mqar.generate(cfg.batch_size, cfg.vocab_size, cfg.seq_len,
                                 cfg.num_kv_pairs, rng, random_non_queries=cfg.random_non_queries)
        return fresh
    x, y = mqar.generate(cfg.train_examples, cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs,
                         np.random.default_rng([seed, 2]),
                         random_non_queries=cfg.random_non_queries)
    per_epoch = -(-cfg.train_examples // cfg.batch_size)

    def fixed(step):
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([seed, 3, epoch]).permutation(cfg.train_examples)
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        return x[idx], y[idx]
    return fixed


def evaluator(cfg: MQARConfig, seed: int, batch: int = 256, backend: str = "torch"):
    x, y = mqar.generate(cfg.test_examples, cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs,
                         np.random.default_rng([seed, 4]),
                         random_non_queries=cfg.random_non_queries)

    def logits_torch(model, xb, mask):
        dev = next(model.parameters()).device
        with torch.no_grad():
            out = model(torch.as_tensor(xb, device=dev), torch.as_tensor(mask, device=dev))
        return out.cpu().numpy()

    if backend == "jax":
        from memcore.tasks.jax_stack import logits_at as logits_of
    else:
        logits_of = logits_torch

    def evaluate(model):
        preds = np.full(y.shape, -1, dtype=np.int64)
        for s in range(0, len(x), batch):
            mask = y[s:s + batch] != mqar.IGNORE
            pb = np.full(mask.shape, -1, dtype=np.int64)
            pb[mask] = logits_of(model, x[s:s + batch], mask).argmax(-1)
            preds[s:s + batch] = pb
        return mqar.accuracy(preds, y)
    return evaluate, x


def run_one(name: str, cfg: MQARConfig, seed: int = 0, device: str = "cpu",
            out_dir: str | None = None, resume: bool = False, checkpoint_every: int = 0,
            log_every: int = 50, quiet: bool = False, backend: str = "torch") -> dict:
    spec = model_spec(name, cfg)
    tcfg = TrainConfig(steps=cfg.total_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       seed=seed, aux_weight=cfg.aux_weight, log_every=log_every,
                       eval_every=cfg.eval_every, early_stop=cfg.early_stop,
                       checkpoint_every=checkpoint_every, out_dir=out_dir, device=device)
    evaluate, x_test = evaluator(cfg, seed, backend=backend)
    if resume and not (out_dir and os.path.exists(os.path.join(out_dir, CHECKPOINT))):
        if not out_dir:
            raise ValueError("--resume needs --out (the folder holding the checkpoints)")
        resume = False  # this model had not written a checkpoint yet: it starts afresh
    if backend == "jax":
        from memcore.tasks.jax_stack import JaxTaskLM

        model = JaxTaskLM(spec, seed=seed, short_conv=cfg.short_conv)
    else:
        model = TaskLM(spec, seed=seed, short_conv=cfg.short_conv)
    model, res, params = runs.train_model(backend, model, _batches(cfg, seed), tcfg,
                                          eval_fn=evaluate, resume=resume, name=name,
                                          quiet=quiet)
    if backend == "jax":
        state_bytes = model.state_bytes(x_test[:1])
    else:
        model.to("cpu")
        state_bytes = model.state_bytes(torch.as_tensor(x_test[:1]))
    return {"accuracy": res["metric"], "state_bytes": state_bytes, "params": params,
            "steps": res["steps"], "seconds": round(res["seconds"], 1),
            "final_loss": res["losses"][-1] if res["losses"] else None,
            "backend": backend, "spec": json.loads(spec.to_json())}


def full_plan(models) -> list:
    """Zoology Figure 2: every (model, L, kv, d, lr); the best LR per (model, L, d) is kept."""
    plan = []
    for name in models:
        for L, kv, batch in FULL_GRID:
            for d in FULL_WIDTHS:
                for lr in FULL_LRS:
                    cfg = MQARConfig(vocab_size=8192, seq_len=L, num_kv_pairs=kv, d_model=d,
                                     batch_size=batch, lr=lr, epochs=64,
                                     train_examples=100_000, test_examples=3_000,
                                     window=max(8, L // 16), chunk=16, select=2 * kv // 4 or 1,
                                     capacity=4 * kv, d_state=16, short_conv=0,
                                     eval_every=-(-100_000 // batch))
                    plan.append((name, cfg))
    return plan


def _one_thread():
    torch.set_num_threads(1)
    # XLA reads its flags when JAX starts, which in a fresh worker is after this.
    flag = "--xla_cpu_multi_thread_eigen=false"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def _run_one_args(args):
    return args[0], run_one(*args)


def _map(jobs_args: list, jobs: int):
    """(name, result) as each model finishes: in this process for one job, else in a pool of
    spawned single-thread processes (two small processes use two cores better than one
    process with two threads)."""
    if jobs == 1 or len(jobs_args) == 1:
        for a in jobs_args:
            yield _run_one_args(a)
        return
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                initializer=_one_thread) as pool:
        futures = [pool.submit(_run_one_args, a) for a in jobs_args]
        for f in cf.as_completed(futures):
            yield f.result()


def run(models, quick: bool = True, seed: int = 0, device: str = "cpu",
        out_dir: str | None = None, overrides: dict | None = None, resume: bool = False,
        checkpoint_every: int = 0, backend: str = "torch", log_every: int = 50,
        quiet: bool = False, jobs: int = 1) -> dict:
    """Train and evaluate every model (``jobs`` at a time, in separate processes of one
    thread each); write results.json, log.jsonl and the plot under ``out_dir``. Returns the
    results dict."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an int >= 1, got {jobs!r}")
    check_backend(backend)
    models = check_models(models)
    t0 = time.time()
    say = runs.say_unless(quiet)
    results: dict = {"models": {}, "deviations": [], "seed": seed, "device": device,
                     "backend": backend}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(MQARConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"mqar: unknown configuration fields {unknown}")
    if quick:
        cfg = replace(QUICK, **overrides)
        if "steps" in overrides and "eval_every" not in overrides:
            cfg = replace(cfg, eval_every=min(QUICK.eval_every, cfg.steps))
        results["config"] = asdict(cfg)
        results["deviations"] = list(QUICK_DEVIATIONS)
        if overrides:
            results["deviations"].append(f"quick configuration overridden: {overrides}")
        say("memcore mqar --quick: deviations from Zoology's protocol:")
        for dv in results["deviations"]:
            say(f"  - {dv}")
        jobs_args = [(name, cfg, seed, device, os.path.join(out_dir, name) if out_dir else None,
                      resume, checkpoint_every, log_every, quiet, backend) for name in models]
        for name, res in _map(jobs_args, jobs):
            results["models"][name] = res
            say(f"[{name}] accuracy {res['accuracy']:.4f}")
            runs.write_results(results, out_dir, t0)  # a long run leaves what it has finished
        results["models"] = {n: results["models"][n] for n in models}  # the order asked for
    else:
        results["config"] = {"protocol": "zoology figure 2", "grid": FULL_GRID,
                             "widths": FULL_WIDTHS, "lrs": FULL_LRS, "vocab_size": 8192}
        sweep = []
        for name, cfg in full_plan(models):
            cfg = replace(cfg, **overrides)
            tag = f"{name}-L{cfg.seq_len}-d{cfg.d_model}-lr{cfg.lr:.2e}"
            sub = os.path.join(out_dir, tag) if out_dir else None
            r = run_one(name, cfg, seed, device, sub, resume, checkpoint_every, log_every,
                        quiet, backend)
            sweep.append({"model": name, "seq_len": cfg.seq_len,
                          "num_kv_pairs": cfg.num_kv_pairs, "d_model": cfg.d_model, "lr": cfg.lr,
                          **r})
        results["runs"] = sweep
        for name in models:  # headline: the best over LR at the largest (L, d) grid point
            mine = [r for r in sweep if r["model"] == name]
            best = max(mine, key=lambda r: (r["seq_len"], r["d_model"], r["accuracy"]))
            results["models"][name] = {k: best[k] for k in ("accuracy", "state_bytes", "params")}
    return runs.finish(results, out_dir, t0, plots.accuracy_vs_memory, "mqar.png")


def table(results: dict) -> str:
    return runs.table(
        f"{'model':<20} {'accuracy':>8} {'state bytes':>12} {'params':>9} {'seconds':>8}", 61,
        (f"{name:<20} {r['accuracy']:>8.4f} {r['state_bytes']:>12,} "
         f"{r['params']:>9,} {r.get('seconds', float('nan')):>8}"
         for name, r in results["models"].items()))
