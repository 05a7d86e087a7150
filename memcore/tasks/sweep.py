"""One table of the protocol (``memcore.tasks.protocol``) for the moons, regbench and lm tasks:
every (model, learning rate, seed) trained, ``jobs`` at a time, each finished run kept under
``--out`` as ``<model>/lr<lr>-seed<seed>/run.json`` with the configuration it ran.

A command finds the runs already finished under its ``--out`` and trains only the others, so
that a table can be filled by several commands (a model or a seed at a time). A task whose runs
are resumable (``checkpointing``: moons, regbench) checkpoints each run as it trains, and a
later command resumes an interrupted run from its last checkpoint, so a killed command loses
only the steps since then; lm's runs start again (their best checkpoint's test curves are held
outside the loop's history). A run, finished or not, of another configuration is refused,
naming the field that differs: each run writes its configuration to ``config.json`` before
it trains.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from memcore.tasks import protocol, runs
from memcore.tasks.train import CHECKPOINT

RUN_FILE = "run.json"
START_FILE = "config.json"


def run_dir(out_dir: str | None, model: str, lr: float, seed: int) -> str | None:
    """Where a run writes its logs and its ``run.json`` (None without ``--out``)."""
    return os.path.join(out_dir, model.replace(" ", "_"), f"lr{lr:.3g}-seed{seed}") \
        if out_dir else None


def finished_run(sub: str | None, config: dict, what: str) -> dict | None:
    """The result kept under ``sub`` by an earlier command (None if that run has not finished);
    a kept run of another configuration is refused by name."""
    path = os.path.join(sub, RUN_FILE) if sub else None
    if not path or not os.path.exists(path):
        return None
    with open(path) as fh:
        kept = json.load(fh)
    runs.check_same_run(kept.get("config", {}), config, what, sub)
    return kept["result"]


def start_run(sub: str | None, config: dict, what: str) -> None:
    """Before an unfinished run under ``sub`` trains: refuse it if an interrupted run of another
    configuration is there (its checkpoint would be resumed into this one), then write this
    configuration for a later command to check."""
    if not sub:
        return
    path = os.path.join(sub, START_FILE)
    if os.path.exists(path):
        with open(path) as fh:
            runs.check_same_run(json.load(fh), config, what, sub)
    runs.write_json(os.path.join(sub, START_FILE), config)


def checkpointing(sub: str | None, every: int) -> tuple[dict, bool]:
    """A resumable run's checkpoints, as ``TrainConfig`` fields (every ``every`` steps and after
    the last, under ``sub``; none without ``--out``), and whether an interrupted run left a
    checkpoint there to resume from."""
    if not sub:
        return {}, False
    return ({"checkpoint_every": every, "checkpoint_at_end": True},
            os.path.exists(os.path.join(sub, CHECKPOINT)))


def keep_run(sub: str | None, config: dict, result: dict) -> None:
    """Write a finished run's result under ``sub`` (atomically), for a later command to reuse."""
    if sub:
        runs.write_json(os.path.join(sub, RUN_FILE), {"config": config, "result": result})


def run_all(what: str, fn: Callable, models, sweep: protocol.Sweep, config: dict,
            args: tuple, out_dir: str | None, jobs: int, say: Callable[[str], None],
            describe: Callable[[dict], str]) -> dict[str, list[dict]]:
    """``fn(model, lr, seed, run_dir, *args) -> result`` (a JSON-able dict with "lr" and "seed")
    for every model and every run of ``sweep``, in single-thread worker processes when ``jobs``
    > 1 (``fn`` importable, ``args`` picklable). ``config`` is what fixes a run besides its
    model, rate and seed; ``describe(result)`` its progress line. Returns each model's results,
    ordered by (lr, seed)."""
    done: dict[str, list[dict]] = {m: [] for m in models}
    todo = []
    for m in models:
        for lr, seed in sweep.runs:
            sub = run_dir(out_dir, m, lr, seed)
            kept = finished_run(sub, config, what)
            if kept is None:
                start_run(sub, config, what)
                todo.append((m, lr, seed, sub, *args))
            else:
                done[m].append(kept)
    if any(done.values()):
        say(f"{what}: {sum(len(v) for v in done.values())} finished run(s) found under "
            f"{out_dir}; {len(todo)} to train")
    for a, result in runs.map_jobs(fn, todo, jobs):
        keep_run(a[3], config, result)
        done[a[0]].append(result)
        say(f"[{a[0]}] lr {result['lr']:.2e} seed {result['seed']}: {describe(result)}")
    return {m: sorted(rs, key=lambda r: (r["lr"], r["seed"])) for m, rs in done.items()}
