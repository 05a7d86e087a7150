"""What the tasks' runs share: training one model under either backend's loop, the progress
lines, the results table, and results.json with the plot."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable


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


def table(head: str, width: int, rows) -> str:
    """A results table: the header, a rule ``width`` long, one line per row."""
    return "\n".join([head, "-" * width, *rows])


def write_results(results: dict, out_dir: str | None, t0: float) -> None:
    """The wall time since ``t0`` into ``results``, and results.json under ``out_dir``
    (written whole, then moved into place: a reader never sees half a file)."""
    results["seconds"] = round(time.time() - t0, 1)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, ".results.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=2)
        os.replace(tmp, os.path.join(out_dir, "results.json"))


def finish(results: dict, out_dir: str | None, t0: float,
           plot: Callable[[dict, str], str | None], filename: str) -> dict:
    """The end of a task's run: ``write_results``, then ``plot(results, path)`` drawn into
    ``out_dir/filename`` (its path, or None, under ``results["plot"]``)."""
    write_results(results, out_dir, t0)
    if out_dir:
        results["plot"] = plot(results, os.path.join(out_dir, filename))
    return results
