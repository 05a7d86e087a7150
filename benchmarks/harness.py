"""Timing and reporting shared by the benchmarks: warm-up, medians, the machine's name, tables
and JSON files of the figures."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable


def machine() -> str:
    """A one-line description of where the numbers come from."""
    parts = [platform.machine(), platform.system(), f"Python {platform.python_version()}",
             f"{os.cpu_count()} logical cores"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name()}")
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    parts.insert(0, line.split(":", 1)[1].strip())
                    break
    except OSError:
        pass
    return ", ".join(parts)


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1,
                sync: Callable[[], None] | None = None, budget_s: float | None = None) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs.
    ``budget_s`` stops repeating early (at least one timed run) once exceeded."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    start_all = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start_all > budget_s:
            break
    return statistics.median(times)


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def jsonable(obj):
    """``obj`` with every NaN or infinite float replaced by None (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """Write ``obj`` as strict JSON, replacing the file at once: a run cut short leaves the
    previous complete version, never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
