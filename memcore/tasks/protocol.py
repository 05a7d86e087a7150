"""The experimental protocol every task shares: held-out sets, the learning-rate and seed sweep,
selection on validation, and mean +- std over seeds.

- A validation set, disjoint from the test set (no example in both), makes every choice: the
  early stop and the checkpoint of each run, the learning rate of each model. The test set is
  read only to report.
- Each model runs every (learning rate, seed) of one ``Sweep`` (at least ``MIN_LRS`` rates and
  ``MIN_SEEDS`` seeds; fewer is a recorded deviation), with the same training budget as every
  other model of its table.
- ``select``: each run reports the validation metric of its best checkpoint and the test metric
  of that same checkpoint (``best_evaluation``); per model, the learning rate with the best mean
  validation metric over seeds is kept, and the test metric at that rate is reported as the mean
  and the sample standard deviation over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_LRS = 3
MIN_SEEDS = 3


@dataclass(frozen=True)
class Sweep:
    """The learning rates and seeds every model of a table runs."""

    lrs: tuple
    seeds: tuple

    def __post_init__(self):
        lrs, seeds = tuple(self.lrs), tuple(self.seeds)
        if not lrs or any(isinstance(x, bool) or not isinstance(x, (int, float)) or
                          not math.isfinite(x) or x <= 0 for x in lrs):
            raise ValueError(f"--lrs must be one or more floats > 0, got {list(lrs)!r}")
        if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or
                            s < 0 for s in seeds):
            raise ValueError(f"--seeds must be one or more ints >= 0, got {list(seeds)!r}")
        for flag, values in (("--lrs", lrs), ("--seeds", seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{flag} must be distinct, got {list(values)!r}")
        object.__setattr__(self, "lrs", tuple(float(x) for x in lrs))
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))

    @property
    def runs(self) -> list[tuple[float, int]]:
        """Every (learning rate, seed), rates outermost."""
        return [(lr, seed) for lr in self.lrs for seed in self.seeds]

    def deviations(self) -> list[str]:
        """What this sweep lacks against the protocol (empty when it has enough)."""
        out = []
        if len(self.lrs) < MIN_LRS:
            out.append(f"{len(self.lrs)} learning rate(s) {list(self.lrs)} instead of a sweep "
                       f"of at least {MIN_LRS}")
        if len(self.seeds) < MIN_SEEDS:
            out.append(f"{len(self.seeds)} seed(s) {list(self.seeds)} instead of at least "
                       f"{MIN_SEEDS}: no spread over seeds (every reported std is 0)")
        return out


# -- held-out sets -------------------------------------------------------------------------------

def _row_keys(arrays: Sequence[np.ndarray]) -> list[bytes]:
    """One key per example: the bytes of its row in every array (inputs and labels)."""
    rows = [np.ascontiguousarray(np.asarray(a).reshape(len(a), -1)) for a in arrays]
    n = {len(r) for r in rows}
    if len(n) != 1:
        raise ValueError(f"held-out arrays must have one example per row, got lengths {n}")
    return [b"".join(r[i].tobytes() for r in rows) for i in range(len(rows[0]))]


def not_in(candidates: Sequence[np.ndarray], held_out: Sequence[np.ndarray]) -> np.ndarray:
    """A boolean mask over the examples of ``candidates`` (a tuple of arrays, one example per
    row): True where the example is not one of ``held_out``'s (nor an earlier candidate's,
    so the kept examples are distinct too)."""
    seen = set(_row_keys(held_out))
    keep = []
    for key in _row_keys(candidates):
        keep.append(key not in seen)
        seen.add(key)
    return np.asarray(keep, dtype=bool)


def check_disjoint(a: Sequence[np.ndarray], b: Sequence[np.ndarray],
                   names: tuple[str, str] = ("validation", "test")) -> None:
    """Raise unless no example of ``a`` is also one of ``b``."""
    shared = len(set(_row_keys(a)) & set(_row_keys(b)))
    if shared:
        raise ValueError(f"the {names[0]} and {names[1]} sets share {shared} example(s)")


def held_out(draw: Callable[[int], tuple], n: int, exclude: Sequence[np.ndarray],
             tries: int = 16) -> tuple:
    """``n`` examples from ``draw(k) -> arrays of k examples`` (successive calls give fresh
    examples), none of them in ``exclude`` and none twice; raises when ``tries`` draws cannot
    find that many (a task too small for disjoint sets)."""
    parts, seen, have = [], list(exclude), 0
    for _ in range(tries):
        arrays = draw(n)
        keep = not_in(arrays, seen)
        kept = tuple(a[keep] for a in arrays)
        parts.append(kept)
        seen = [np.concatenate([s, k]) for s, k in zip(seen, kept, strict=True)]
        have += len(kept[0])
        if have >= n:
            return tuple(np.concatenate([p[i] for p in parts])[:n] for i in range(len(kept)))
    raise ValueError(f"cannot draw {n} held-out examples distinct from the {len(exclude[0])} "
                     f"excluded ones in {tries} tries: the task has too few distinct examples")


# -- selection -----------------------------------------------------------------------------------

def best_evaluation(evals: Sequence) -> tuple:
    """The evaluation ``(step, val, extras)`` with the best validation metric (the earliest on
    a tie: the checkpoint where the early stop would keep it), from a training loop's ``evals``
    list of ``(step, val)`` or ``(step, val, extras)``."""
    if not evals:
        raise ValueError("best_evaluation: the run has no evaluation")
    best = None
    for e in evals:
        if best is None or e[1] > best[1]:
            best = e
    return best[0], best[1], dict(best[2]) if len(best) > 2 else {}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("mean_std: no values")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def select(runs: Sequence[dict], metric: str = "accuracy", val: str = "val_accuracy",
           maximize: bool = True) -> dict:
    """The protocol's choice over one model's runs (dicts with "lr", "seed", ``val`` and
    ``metric``): the learning rate whose mean ``val`` over seeds is best (the first in the
    runs' order on a tie), and at that rate the mean and std of ``metric`` and ``val``, the
    seeds, and ``by_lr`` (the same numbers for every rate)."""
    if not runs:
        raise ValueError("select: no runs")
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        by_lr.setdefault(float(r["lr"]), []).append(r)
    seeds = {lr: sorted(int(r["seed"]) for r in rs) for lr, rs in by_lr.items()}
    if len({tuple(s) for s in seeds.values()}) != 1:
        raise ValueError(f"select: every learning rate needs the same seeds, got {seeds}")
    sign = 1.0 if maximize else -1.0
    rows = []
    for lr, rs in by_lr.items():
        v, v_std = mean_std([r[val] for r in rs])
        m, m_std = mean_std([r[metric] for r in rs])
        rows.append({"lr": lr, val: v, f"{val}_std": v_std, metric: m, f"{metric}_std": m_std})
    best = rows[0]
    for row in rows[1:]:
        if sign * row[val] > sign * best[val]:
            best = row
    return {**best, "seeds": seeds[best["lr"]], "by_lr": rows}
