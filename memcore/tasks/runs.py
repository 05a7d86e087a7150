"""What the tasks' runs share: training one model under either backend's loop, runs side by side
in worker processes, the progress lines, the results table, results.json with the plot, and
the checks that a resumed or extended run is the run under ``--out`` (a task's results.json, a
training loop's checkpoint)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

from memcore.atomic_files import atomic_write


def check_counts(task: str, cfg, names) -> None:
    """A task configuration's fields ``names`` must be ints >= 1."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{task}: {name} must be an int >= 1, got {v!r}")


def say_unless(quiet: bool) -> Callable[[str], None]:
    """A task's progress lines on stderr (none when ``quiet``)."""
    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def train_model(backend: str, model, batches: Callable, tcfg,
                backend_options: dict | None = None, **options) -> tuple[object, dict, int]:
    """Train ``model`` (of ``backend``) with that backend's loop (``memcore.tasks.train`` or
    ``jax_train``), passing it ``options`` and ``backend_options[backend]`` (what differs
    between the loops). Returns (the trained model, the loop's result, its parameter count)."""
    options = {**options, **(backend_options or {}).get(backend, {})}
    if backend == "jax":
        from memcore.tasks import jax_train
        from memcore.tasks.jax_stack import n_params

        res = jax_train.train(model, batches, tcfg, **options)
        return res["model"], res, n_params(res["model"])
    from memcore.tasks.train import train

    res = train(model, batches, tcfg, **options)
    return model, res, sum(p.numel() for p in model.parameters())


def one_thread() -> None:
    """A worker process's setup: one torch thread, and XLA's multi-threaded Eigen off."""
    import torch

    torch.set_num_threads(1)
    # XLA reads its flags when JAX starts, which in a fresh worker is after this.
    flag = "--xla_cpu_multi_thread_eigen=false"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def map_jobs(fn: Callable, jobs_args: list, jobs: int):
    """``(args, fn(*args))`` for each of ``jobs_args`` as each finishes: in this process for
    one job, else in a pool of ``jobs`` spawned single-thread processes (two small processes
    use two cores better than one process with two threads). ``fn`` must be importable."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an int >= 1, got {jobs!r}")
    if jobs == 1 or len(jobs_args) <= 1:
        for a in jobs_args:
            yield a, fn(*a)
        return
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                initializer=one_thread) as pool:
        futures = {pool.submit(fn, *a): a for a in jobs_args}
        for f in cf.as_completed(futures):
            yield futures[f], f.result()


# What fixes a run's trajectory: a resume must not change any of them.
RESUME_FIELDS = ("seed", "lr", "steps", "weight_decay", "warmup", "min_lr_ratio", "schedule",
                 "betas", "aux_weight", "grad_clip")


def previous_results(out_dir: str | None) -> dict | None:
    """The results.json under ``out_dir``, or None."""
    path = os.path.join(out_dir, "results.json") if out_dir else None
    if not path or not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def check_same_run(previous: dict, current: dict, what: str, out_dir: str) -> None:
    """Refuse to continue the run under ``out_dir`` (its results.json: ``previous``) with
    another configuration: the first field (nested dicts compared field by field; a field on
    one side only compared with None, as a field added at its default is left out) that
    differs is named."""
    def walk(old, new, path):
        if isinstance(old, dict) and isinstance(new, dict):
            for k in [*new, *(k for k in old if k not in new)]:
                walk(old.get(k), new.get(k), f"{path}.{k}" if path else k)
        elif json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
            raise ValueError(f"{what}: {path} differs from the run under {out_dir} ({old!r} "
                             f"there, now {new!r}); use the same settings or another --out")
    walk(previous, current, "")


def spec_of(model) -> dict | None:
    """The model spec of a task model (its ``spec``), as JSON data for a checkpoint, or None."""
    spec = getattr(model, "spec", None)
    return json.loads(spec.to_json()) if hasattr(spec, "to_json") else None


def checkpoint_meta(path: str) -> dict:
    """The JSON metadata of a training checkpoint (either backend's), without its tensors."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    with safe_open(path, framework="numpy") as f:
        return json.loads(f.metadata()["train_state"])


def check_resume(meta: dict, cfg, spec: dict | None, path: str,
                 backend: str = "torch") -> None:
    """Refuse to resume from ``path`` (metadata ``meta``) into a run of another trajectory: the
    other backend's checkpoint, a field of ``RESUME_FIELDS``, or the model (width, vocabulary,
    layers) changed."""
    written = meta.get("backend", "torch")
    if written != backend:
        raise ValueError(f"--resume: {path} was written by the {written} backend; resume it "
                         f"with --backend {written}")
    was = meta.get("config", {})
    now = json.loads(json.dumps(asdict(cfg)))
    for name in RESUME_FIELDS:
        if name in was and was[name] != now[name]:
            raise ValueError(f"--resume: {name} differs from the checkpoint's ({was[name]!r} "
                             f"in {path}, now {now[name]!r}); resume with the same {name} or "
                             f"start afresh under another --out")
    old = meta.get("spec")
    if old is None or spec is None or old == spec:
        return
    for key, what in (("vocab_size", "vocabulary"),):
        if old.get(key) != spec.get(key):
            raise ValueError(f"--resume: the {what} ({key}) differs from the checkpoint's "
                             f"({old.get(key)} in {path}, now {spec.get(key)})")
    widths = [{lay.get("d_model") for lay in s.get("layers", [])} for s in (old, spec)]
    if widths[0] != widths[1]:
        raise ValueError(f"--resume: the width (d_model) differs from the checkpoint's "
                         f"({sorted(widths[0])} in {path}, now {sorted(widths[1])})")
    raise ValueError(f"--resume: the model spec differs from the checkpoint's in {path} "
                     f"(another model or other layer settings)")


def table(head: str, width: int, rows) -> str:
    """A results table: the header, a rule ``width`` long, one line per row."""
    return "\n".join([head, "-" * width, *rows])


def write_json(path: str, data, indent: int = 1) -> None:
    """``data`` as JSON at ``path``, written whole and moved into place (``atomic_write``: a
    reader never sees half a file, and a killed writer leaves no temporary for long)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=indent)
    atomic_write(path, write)


def write_results(results: dict, out_dir: str | None, t0: float) -> None:
    """The wall time since ``t0`` into ``results``, and results.json under ``out_dir``."""
    results["seconds"] = round(time.time() - t0, 1)
    if out_dir:
        write_json(os.path.join(out_dir, "results.json"), results, indent=2)


def finish(results: dict, out_dir: str | None, t0: float,
           plot: Callable[[dict, str], str | None], filename: str) -> dict:
    """The end of a task's run: ``write_results``, then ``plot(results, path)`` drawn into
    ``out_dir/filename`` (its path, or None, under ``results["plot"]``)."""
    write_results(results, out_dir, t0)
    if out_dir:
        results["plot"] = plot(results, os.path.join(out_dir, filename))
    return results
