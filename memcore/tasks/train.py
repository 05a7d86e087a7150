"""The tasks' common training loop (torch): AdamW, cosine schedule, seeds, JSON-lines logs,
progress lines on stderr, atomic safetensors checkpoints and exact resume.

Exact resume rests on three things: every batch is a pure function of (seed, step), the learning
rate is a pure function of the step, and a checkpoint holds the model, the optimizer's moments
and step counts, and torch's RNG state. Continuing from a checkpoint therefore replays the same
trajectory as an uninterrupted run. A resume whose configuration would change that trajectory
(``runs.RESUME_FIELDS``, the model's width or vocabulary) is refused, naming what changed; the log
keeps one record per step (what was logged after the checkpoint is dropped before those steps
run again) and the run's ``seconds`` count on from the checkpoint's.

Under ``torchrun`` (WORLD_SIZE > 1) the loop runs data parallel: each rank trains on every
world-th example of the step's batch, DistributedDataParallel averages the gradients, and rank 0
alone writes logs and checkpoints.

Checkpoints are written and read by ``memcore.tasks.train_checkpoint``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memcore.tasks.mqar import IGNORE
from memcore.tasks.runs import check_resume, checkpoint_meta, spec_of
from memcore.tasks.train_checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.safetensors"
BACKENDS = ("torch", "jax")


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"  # or "linear"
    betas: tuple = (0.9, 0.999)
    seed: int = 0
    aux_weight: float = 0.1  # weight of the bmojo layers' innovation loss
    grad_clip: float | None = 1.0
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end
    early_stop: float | None = None  # stop once the evaluation metric exceeds this
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_at_end: bool = False  # also after the last step (or the early stop)
    out_dir: str | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "warmup", "log_every", "eval_every", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig: {name} must be an int >= 0, got {v!r}")
        if not self.steps:
            raise ValueError("TrainConfig: steps must be >= 1, got 0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TrainConfig: lr must be a float > 0, got {self.lr!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"TrainConfig: schedule must be 'cosine' or 'linear', got "
                             f"{self.schedule!r}")
        for name in ("checkpoint_every", "checkpoint_at_end"):
            if getattr(self, name) and not self.out_dir:
                raise ValueError(f"TrainConfig: {name} needs out_dir (where to write)")


def log_progress(name: str, step: int, cfg: TrainConfig, loss: float, rate: float,
                 seconds: float, log: Callable[[dict], None], quiet: bool) -> None:
    """Every ``cfg.log_every`` steps: a progress line on stderr (``rate`` steps/s in this
    process) and a JSON-lines record (``seconds`` of the run so far); the same for both
    backends' loops."""
    if cfg.log_every and step % cfg.log_every == 0:
        say(f"[{name}] step {step}/{cfg.steps} loss {loss:.4f} "
             f"lr {lr_at(step - 1, cfg):.2e} {rate:.2f} steps/s", quiet)
        log({"step": step, "loss": loss, "lr": lr_at(step - 1, cfg), "seconds": seconds})


def check_backend(backend: str) -> None:
    """torch trains with ``train`` below, jax with ``memcore.tasks.jax_train`` (same
    configuration and behaviour). JAX needs jax, equinox and optax installed, and runs in one
    process: torchrun's data parallel (WORLD_SIZE > 1) is torch only."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "jax":
        import importlib.util

        missing = [m for m in ("jax", "equinox", "optax") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"--backend jax needs jax, equinox and optax installed "
                             f"(pip install 'memcore[jax]'); missing: {', '.join(missing)}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise ValueError(f"--backend jax runs in one process; torchrun data parallel "
                             f"(WORLD_SIZE={world}) needs --backend torch")


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device must be a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    return dev


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine (or linear) decay from lr to lr * min_lr_ratio at
    ``cfg.steps``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr + (floor - cfg.lr) * frac
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms, gains and 1-d parameters are left alone.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def masked_loss(model, inputs, labels, aux_weight: float, aux_source=None):
    """Cross-entropy at labelled positions only (logits computed only there), plus the
    weighted aux loss (read from ``aux_source``, default ``model``). Returns
    (total, cross_entropy)."""
    mask = labels != IGNORE
    logits = model(inputs, mask)
    ce = torch.nn.functional.cross_entropy(logits.float(), labels[mask])
    aux = getattr(model if aux_source is None else aux_source, "aux_loss", None)
    total = ce if aux is None or not aux_weight else ce + aux_weight * aux
    return total, ce


# -- the loop ------------------------------------------------------------------------------------

def distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under ``torchrun`` (WORLD_SIZE > 1) the process group is started
    here: gloo on CPU, nccl on CUDA."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def say(msg: str, quiet: bool) -> None:
    """A progress line on stderr (both backends' loops)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Run:
    """Where a run starts (both backends' loops): its first step, the history so far, the
    checkpoint path (None without ``out_dir``), the JSON-lines log, the seconds already spent
    before ``start`` and whether the run had stopped early there."""
    start: int
    losses: list
    evals: list
    checkpoint: str | None
    log: Callable[[dict], None]
    seconds: float = 0.0
    stopped: bool = False


def _keep_log_until(path: str, step: int) -> None:
    """Drop the records of steps after ``step`` from the JSON-lines log at ``path`` (they were
    written after the checkpoint and are about to run again)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def start_run(cfg: TrainConfig, name: str, quiet: bool, resume: bool,
              load: Callable[[str], dict], write_log: bool = True,
              spec: dict | None = None, backend: str = "torch") -> Run:
    """The run's folder, log and checkpoint path; with ``resume``, ``load(path)`` restores the
    checkpoint and returns its metadata (first checked against ``backend``, ``cfg`` and the
    model's ``spec`` by ``check_resume``), else a fresh run starts a fresh log."""
    log_path = ckpt_path = None
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log_path = os.path.join(cfg.out_dir, "log.jsonl") if write_log else None
        ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT)
    run = Run(0, [], [], ckpt_path, lambda record: None)
    if resume:
        if not ckpt_path:
            raise ValueError("--resume needs --out (the folder holding the checkpoint)")
        # The metadata is checked before anything loads: another model's tensors would fail
        # to load with a less telling error.
        check_resume(checkpoint_meta(ckpt_path), cfg, spec, ckpt_path, backend)
        meta = load(ckpt_path)
        hist = meta["history"]
        run.start = meta["step"]
        run.losses = list(hist["losses"])
        run.evals = [tuple(e) for e in hist["evals"]]
        run.seconds = float(hist.get("seconds", 0.0))
        run.stopped = bool(hist.get("stopped", False))
        if log_path:
            _keep_log_until(log_path, run.start)
        say(f"[{name}] resumed from {ckpt_path} at step {run.start}", quiet)
    elif log_path and os.path.exists(log_path):
        os.remove(log_path)

    def log(record: dict) -> None:
        if log_path:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"model": name, **record}) + "\n")

    run.log = log
    return run


def _evaluation(result) -> tuple[float, dict]:
    """An ``eval_fn`` result: a float (the selection metric), or a dict with the selection
    metric under "val" and other numbers (e.g. "test") recorded beside it."""
    if isinstance(result, dict):
        if "val" not in result:
            raise ValueError(f"eval_fn returned a dict without 'val' (the metric the early "
                             f"stop and the selection read): keys {sorted(result)}")
        return float(result["val"]), {k: float(v) for k, v in result.items() if k != "val"}
    return float(result), {}


def run_steps(cfg: TrainConfig, name: str, quiet: bool, run: Run, step_fn: Callable[[int], float],
              evaluate: Callable[[bool], float | dict] | None,
              save: Callable[[str, int, dict], None] | None) -> dict:
    """The steps from ``run.start`` to ``cfg.steps`` (both backends' loops): ``step_fn(step)``
    trains one step and returns its reported loss; ``evaluate(final)`` the metric, a float or
    a dict (see ``_evaluation``; ``final``: after the last step, training over);
    ``save(path, step, history)`` writes a checkpoint (None: this process writes none).
    Progress, evaluation, early stop and checkpoints as ``train`` documents. ``evals`` holds
    ``(step, metric)``, or ``(step, val, extras)`` for dict evaluations."""
    losses, evals, log = run.losses, run.evals, run.log
    t0 = time.time()

    def seconds() -> float:
        return run.seconds + time.time() - t0

    def history(stopped: bool) -> dict:
        return {"losses": losses, "evals": evals, "seconds": seconds(), "stopped": stopped}

    def record(step: int, final: bool) -> float:
        val, extras = _evaluation(evaluate(final))
        evals.append((step, val, extras) if extras else (step, val))
        log({"step": step, "eval": val, **extras, "seconds": seconds()})
        return val

    metric = evals[-1][1] if evals else None
    step, stop = run.start, run.stopped
    while step < cfg.steps and not stop:
        losses.append(step_fn(step))
        step += 1
        rate = (step - run.start) / max(1e-9, time.time() - t0)
        log_progress(name, step, cfg, losses[-1], rate, seconds(), log, quiet)
        if evaluate is not None and (step == cfg.steps or
                                     (cfg.eval_every and step % cfg.eval_every == 0)):
            metric = record(step, False)
            say(f"[{name}] step {step} eval {metric:.4f}", quiet)
            stop = cfg.early_stop is not None and metric > cfg.early_stop
            if stop:
                say(f"[{name}] early stop at step {step}: {metric:.4f} > {cfg.early_stop}",
                    quiet)
        last = step == cfg.steps or stop
        if save is not None and run.checkpoint and (
                (cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or stop)) or
                (cfg.checkpoint_at_end and last)):
            save(run.checkpoint, step, history(stop))
    if evaluate is not None and (not evals or evals[-1][0] != step):
        metric = record(step, True)
    return {"losses": losses, "evals": evals, "steps": step, "metric": metric,
            "seconds": seconds(), "stopped": stop}


def train(model: torch.nn.Module, batch_fn: Callable, cfg: TrainConfig,
          eval_fn: Callable | None = None, resume: bool = False, name: str = "model",
          quiet: bool = False, loss_fn: Callable | None = None) -> dict:
    """Train ``model`` for ``cfg.steps`` AdamW steps on ``batch_fn(step) -> (inputs, labels)``
    (numpy or torch int arrays, -100 where unlabelled). ``eval_fn(model)`` is called every
    ``eval_every`` steps and at the end and returns a float, or a dict with the validation
    metric under "val" and other numbers beside it; training stops early once the (validation)
    metric exceeds ``early_stop``. ``loss_fn(model, *batch) -> (total, reported)`` replaces the
    masked cross-entropy (e.g. a regression loss; the batch then holds float arrays).
    Returns {"losses": [...], "evals": [(step, metric)], "steps": n, "metric": last metric,
    "seconds": wall time (counting on from a resumed checkpoint's), "stopped": early stop}."""
    dev = check_device(cfg.device)
    rank, world = distributed(dev)
    quiet = quiet or rank != 0
    torch.manual_seed(cfg.seed)
    model.to(dev)
    net = model
    if world > 1:
        # Each rank takes every world-th example of the step's batch; gradients are averaged.
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model, cfg)
    run = start_run(cfg, name, quiet, resume, lambda path: load_checkpoint(path, model, opt),
                    write_log=rank == 0, spec=spec_of(model))  # only rank 0 writes the log

    def step_fn(step: int) -> float:
        batch = [torch.as_tensor(a, device=dev)[rank::world] for a in batch_fn(step)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        if loss_fn is None:
            total, ce = masked_loss(net, *batch, cfg.aux_weight, aux_source=model)
        else:
            total, ce = loss_fn(net, *batch)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return float(ce.detach())

    def evaluate(final: bool):
        model.eval()
        metric = eval_fn(model)
        if not final:
            model.train()
        return metric

    def save(path: str, step: int, history: dict) -> None:
        save_checkpoint(path, model, opt, step, cfg, history)

    model.train()
    return run_steps(cfg, name, quiet, run, step_fn, None if eval_fn is None else evaluate,
                     save if rank == 0 else None)
