"""MQAR experiments: training every model of a plan (``memcore.tasks.mqar_configs``) under the
protocol, and the results.

Every model has 2 mixer layers and no MLP (Zoology). Every mode runs the protocol of
``memcore.tasks.protocol``: each (learning rate, seed) trains on the same budget, early-stops and
keeps its checkpoint on a validation set disjoint from the test set (both sets the same for every
model and seed); each model keeps the rate with the best mean validation accuracy and reports the
test accuracy there, mean +- std over seeds. ``deviations`` lists every departure from Zoology's
protocol, computed from the configuration that ran.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, replace

import numpy as np

from memcore.tasks import mqar, plots, protocol, runs
from memcore.tasks import sweep as sweep_runs
from memcore.tasks.memory import memory_bytes
from memcore.tasks.mqar_configs import MODELS, MQARConfig, deviations, model_spec, plan
from memcore.tasks.stack import task_model
from memcore.tasks.train import CHECKPOINT, TrainConfig, check_backend

TEST_STREAM, VAL_STREAM = 4, 5  # the held-out sets' generator streams (training: [seed, ...])
# Per-step cost on a CPU, most expensive first (the scans, then the hybrids, then attention).
SLOWEST_FIRST = ("bmojo", "bmojo_f", "mamba", "mamba_swa", "jamba", "mosaic", "transformer",
                 "transformer_window")


# -- data ----------------------------------------------------------------------------------------

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


def held_out_sets(cfg: MQARConfig) -> tuple[tuple, tuple]:
    """(validation, test) as (inputs, labels): the same for every model and seed, and no
    example in both."""
    def gen(n, rng):
        return mqar.generate(n, cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs, rng,
                             random_non_queries=cfg.random_non_queries)

    test = gen(cfg.test_examples, np.random.default_rng([TEST_STREAM]))
    rng = np.random.default_rng([VAL_STREAM])
    val = protocol.held_out(lambda n: gen(n, rng), cfg.val_examples, test)
    return val, test


def evaluator(cfg: MQARConfig, backend: str = "torch", batch: int = 256):
    """``evaluate(model) -> {"val": accuracy, "test": accuracy}``; the test set is scored only
    when the validation accuracy is the best of the run so far (the checkpoint the protocol
    may keep), and never chooses anything."""
    (xv, yv), (xt, yt) = held_out_sets(cfg)
    if backend == "jax":
        from memcore.tasks.jax_stack import logits_at as logits_of
    else:
        import torch

        def logits_of(model, xb, mask):
            dev = next(model.parameters()).device
            with torch.no_grad():
                out = model(torch.as_tensor(xb, device=dev), torch.as_tensor(mask, device=dev))
            return out.cpu().numpy()

    def accuracy(model, x, y):
        preds = np.full(y.shape, -1, dtype=np.int64)
        for s in range(0, len(x), batch):
            mask = y[s:s + batch] != mqar.IGNORE
            pb = np.full(mask.shape, -1, dtype=np.int64)
            pb[mask] = logits_of(model, x[s:s + batch], mask).argmax(-1)
            preds[s:s + batch] = pb
        return mqar.accuracy(preds, y)

    best = [-np.inf]

    def evaluate(model):
        out = {"val": accuracy(model, xv, yv)}
        if out["val"] > best[0]:
            best[0] = out["val"]
            out["test"] = accuracy(model, xt, yt)
        return out
    return evaluate


# -- one run, one model, a plan ------------------------------------------------------------------

def run_one(name: str, cfg: MQARConfig, seed: int = 0, device: str = "cpu",
            out_dir: str | None = None, resume: bool = False, checkpoint_every: int = 0,
            log_every: int = 50, quiet: bool = False, backend: str = "torch") -> dict:
    """Train ``name`` at ``cfg.lr`` and ``seed``; the validation accuracy of its best checkpoint
    and the test accuracy of that checkpoint."""
    spec = model_spec(name, cfg)
    tcfg = TrainConfig(steps=cfg.total_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       seed=seed, aux_weight=cfg.aux_weight, log_every=log_every,
                       eval_every=cfg.eval_every, early_stop=cfg.early_stop,
                       checkpoint_every=checkpoint_every, checkpoint_at_end=bool(out_dir),
                       out_dir=out_dir, device=device)
    if resume and not (out_dir and os.path.exists(os.path.join(out_dir, CHECKPOINT))):
        if not out_dir:
            raise ValueError("--resume needs --out (the folder holding the checkpoints)")
        resume = False  # this run had not written a checkpoint yet: it starts afresh
    model = task_model(backend, spec, seed)
    _, res, params = runs.train_model(backend, model, _batches(cfg, seed), tcfg,
                                      eval_fn=evaluator(cfg, backend), resume=resume,
                                      name=name, quiet=quiet)
    step, val, extras = protocol.best_evaluation(res["evals"])
    return {"lr": cfg.lr, "seed": seed, "val_accuracy": val, "accuracy": extras["test"],
            "best_step": step, "steps": res["steps"], "stopped": res["stopped"],
            "seconds": round(res["seconds"], 1), "params": params,
            "final_loss": res["losses"][-1] if res["losses"] else None}


def _run_tagged(tag, *args):
    return run_one(*args)


def _run_identity(args: tuple) -> dict:
    """What fixes one run's result (its configuration, seed, device and backend): a run kept
    under its folder is reused only by a command that asks for the same."""
    tag, name, c, seed, device = args[:5]
    return {"tag": tag, "model": name, "config": asdict(c), "seed": seed, "device": device,
            "backend": args[10]}


def summarize(name: str, cfg: MQARConfig, results: list) -> dict:
    """One model's line of a table: the protocol's selection over its runs, its memory at the
    evaluation length, and the runs themselves."""
    sel = protocol.select(results)
    spec = model_spec(name, cfg)
    at = [r for r in results if r["lr"] == sel["lr"]]
    return {**{k: sel[k] for k in ("accuracy", "accuracy_std", "val_accuracy",
                                   "val_accuracy_std", "lr", "seeds", "by_lr")},
            "memory_bytes": memory_bytes(spec, cfg.seq_len),
            "params": results[0]["params"], "budget_steps": cfg.total_steps,
            "steps": round(float(np.mean([r["steps"] for r in at]))),
            "seconds": round(sum(r["seconds"] for r in results), 1),
            "runs": sorted(results, key=lambda r: (r["lr"], r["seed"])),
            "spec": json.loads(spec.to_json())}


# -- the command ---------------------------------------------------------------------------------

def run(models, mode: str = "quick", lrs=None, seeds=None, device: str = "cpu",
        out_dir: str | None = None, overrides: dict | None = None, swept: dict | None = None,
        resume: bool = False, checkpoint_every: int = 0, backend: str = "torch",
        log_every: int = 50, quiet: bool = False, jobs: int = 1) -> dict:
    """Train every (model, learning rate, seed) of ``plan(models, mode, ...)``, ``jobs`` at a
    time in single-thread processes; select per model; write results.json, the logs, the
    checkpoints and the plot under ``out_dir``. Returns the results dict.

    Under ``--resume`` the run under ``out_dir`` must have the same configuration (refused by
    name otherwise) and each run continues from its checkpoint. The memory sweep keeps the
    points of other families already under ``out_dir`` (same configuration), so it can run
    family by family."""
    check_backend(backend)
    t0 = time.time()
    say = runs.say_unless(quiet)
    variants, sweep, cfg = plan(models, mode, overrides, lrs, seeds, swept)
    results: dict = {"mode": mode, "config": asdict(cfg),
                     "sweep": {"lrs": list(sweep.lrs), "seeds": list(sweep.seeds)},
                     "deviations": deviations(cfg, sweep, models, mode), "models": {},
                     "device": device, "backend": backend}
    if mode != "quick":
        results["points"] = []
    previous = runs.previous_results(out_dir)
    same = {k: results[k] for k in ("mode", "config", "sweep")}
    if previous is not None and (resume or mode == "memory"):
        runs.check_same_run({k: previous.get(k) for k in same}, same,
                            "--resume" if resume else "--sweep memory", out_dir)
        if mode == "memory":  # the points of earlier commands that this one does not rerun
            tags = {tag for tag, *_ in variants}
            results["points"] = [p for p in previous.get("points", []) if p["tag"] not in tags]
            every = list(models) + [p["model"] for p in results["points"]]
            results["deviations"] = deviations(cfg, sweep, every, mode)
    if overrides := {k: v for k, v in (overrides or {}).items() if v is not None}:
        results["overrides"] = overrides
    say(f"memcore mqar ({mode}): {len(variants)} model(s) x {len(sweep.lrs)} learning rate(s) "
        f"x {len(sweep.seeds)} seed(s); deviations from Zoology's protocol:")
    for dv in results["deviations"]:
        say(f"  - {dv}")
    jobs_args, by_tag, kept = [], {}, []
    for tag, name, c, info in variants:
        by_tag[tag] = (name, c, info, [])
        for lr, seed in sweep.runs:
            sub = os.path.join(out_dir, tag, f"lr{lr:.3g}-seed{seed}") if out_dir else None
            args = (tag, name, replace(c, lr=lr), seed, device, sub, resume, checkpoint_every,
                    log_every, quiet, backend)
            res = sweep_runs.finished_run(sub, _run_identity(args), "memcore mqar")
            (jobs_args if res is None else kept).append(args if res is None else (args, res))
    if kept:
        say(f"memcore mqar: {len(kept)} finished run(s) found under {out_dir}; "
            f"{len(jobs_args)} to train")
    # The slowest models first, so that a pool's last jobs are short ones.
    jobs_args.sort(key=lambda a: SLOWEST_FIRST.index(a[1]))
    trained = ((args, res, True) for args, res in runs.map_jobs(_run_tagged, jobs_args, jobs))
    for args, res, new in itertools.chain(((a, r, False) for a, r in kept), trained):
        name, c, info, done = by_tag[args[0]]
        done.append(res)
        if new:
            sweep_runs.keep_run(args[5], _run_identity(args), res)
            say(f"[{args[0]}] lr {res['lr']:.2e} seed {res['seed']}: val "
                f"{res['val_accuracy']:.4f} test {res['accuracy']:.4f} ({res['steps']} steps)")
        if len(done) == len(sweep.runs):
            line = summarize(name, c, done)
            if mode == "quick":
                results["models"][name] = line
            else:
                results["points"].append({"tag": args[0], **info, "model": name, **line})
            runs.write_results(results, out_dir, t0)  # a long run leaves what it has finished
    if mode == "quick":
        results["models"] = {n: results["models"][n] for n in models}  # the order asked for
    else:
        results["points"].sort(key=lambda p: (p["grid"], MODELS.index(p["model"]),
                                              tuple(p["values"].values())))
        for name in models:  # the headline: each model's largest point
            mine = [p for p in results["points"] if p["model"] == name]
            if mine:
                results["models"][name] = max(mine, key=lambda p: (p["memory_bytes"]))
    return runs.finish(results, out_dir, t0, plots.accuracy_vs_memory, "mqar.png")


def layers_text(spec) -> str:
    """A model spec's layers with what sizes their memory, e.g. ``2 x bmojo(window 4, ...)``."""
    def one(layer):
        k = layer.kind
        if k == "mamba":
            return f"mamba(d_state {layer.d_state})"
        if k == "transformer":
            return f"attention(window {layer.window or 'full'})"
        if k == "bmojo_f":
            return f"bmojo_f(window {layer.window}, d_state {layer.d_state})"
        if k == "bmojo":
            return (f"bmojo(window {layer.window}, chunk {layer.chunk}, select {layer.select}, "
                    f"capacity {layer.capacity}, d_state {layer.d_state})")
        return f"mosaic(capacity {layer.capacity or 'all'})" if k == "mosaic" else k
    texts = [one(layer) for layer in spec.layers]
    if len(set(texts)) == 1:
        return f"{len(texts)} x {texts[0]}"
    return " + ".join(texts)


def describe(variants: list, sweep: protocol.Sweep, overrides: dict | None) -> str:
    """The dry run's listing: the overrides, the sweep, and every model configuration."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    lines = [f"memcore mqar: {len(variants) * len(sweep.runs)} training runs planned "
             f"({len(variants)} model configurations x learning rates {list(sweep.lrs)} x "
             f"seeds {list(sweep.seeds)})",
             f"overrides: {given if given else 'none'}"]
    for tag, name, c, _ in variants:
        spec = model_spec(name, c)
        lines.append(f"  {tag}: {layers_text(spec)}; L={c.seq_len} kv={c.num_kv_pairs} "
                     f"V={c.vocab_size} d={c.d_model} batch={c.batch_size} "
                     f"steps={c.total_steps} memory "
                     f"{memory_bytes(spec, c.seq_len):,} B")
    return "\n".join(lines)


def table(results: dict) -> str:
    if results["mode"] == "quick":
        rows = [(name, r) for name, r in results["models"].items()]
    else:
        rows = [(f"{p['model']} {p['grid']} " + " ".join(f"{k}={v}" for k, v in
                                                        p["values"].items()), p)
                for p in results["points"]]
    w = max([20] + [len(n) for n, _ in rows])
    return runs.table(
        f"{'model':<{w}} {'accuracy':>8} {'+-std':>7} {'val':>7} {'lr':>8} {'memory B':>10} "
        f"{'params':>8} {'seconds':>8}", w + 64,
        (f"{n:<{w}} {r['accuracy']:>8.4f} {r['accuracy_std']:>7.4f} {r['val_accuracy']:>7.4f} "
         f"{r['lr']:>8.1e} {r['memory_bytes']:>10,} {r['params']:>8,} {r['seconds']:>8}"
         for n, r in rows))
