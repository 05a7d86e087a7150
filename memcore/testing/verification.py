"""``memcore verify``: the contract's checks for every realization on every installed target.

A target is a backend together with the array library it runs on: the reference on numpy, torch
and JAX arrays, and the torch and JAX backends. All runs are float64, so the tolerances are the
tight ones of DESIGN section 6 (1e-10 for the reference, 1e-9 for a backend against it).
"""

from __future__ import annotations

import importlib.util
import time
import traceback
from dataclasses import dataclass

import numpy as np

from memcore import spec as S
from memcore.api import init, realize

from .checks import TOLERANCE, check_forms_agree, check_outputs_agree, check_split_agrees

TARGETS = ("reference/numpy", "reference/torch", "reference/jax", "torch", "jax")
_LIBRARY = {"reference/numpy": "numpy", "reference/torch": "torch", "reference/jax": "jax",
            "torch": "torch", "jax": "jax"}

# Small, awkward cases: T = 13 is not a multiple of the chunk and exceeds 2W, head width 3.
CASES = {
    "transformer": S.transformer(6, 2),
    "transformer(window)": S.transformer(6, 2, window=4),
    "mamba": S.mamba(6, d_state=3),
    "bmojo_f": S.bmojo_f(6, 2, window=4, d_state=3),
    "bmojo": S.bmojo(6, 2, window=3, chunk=4, select=2, capacity=3, d_state=3),
    "mosaic": S.mosaic(6, 2),
    "mosaic(capacity)": S.mosaic(6, 2, capacity=5),
    "persistent": S.persistent(6, 2, slots=7),
    "model(bmojo)": S.model([S.bmojo(6, 2, window=3, chunk=4, select=2, capacity=3, d_state=3)],
                            vocab_size=11),
    "model(mosaic)": S.model([S.mosaic(6, 2)], vocab_size=11, ffn="persistent", norm="layer"),
    "jamba": S.jamba(6, 2, pattern="MA", vocab_size=11, d_state=3),
}
LENGTH, BATCH = 13, 2


@dataclass
class Row:
    case: str
    target: str
    check: str
    status: str  # "ok", "FAIL", "skipped", "error"
    error: float = float("nan")
    tolerance: float = float("nan")
    detail: str = ""


def target_available(target: str) -> str | None:
    """None when ``target`` can run here, else the reason it cannot."""
    lib = _LIBRARY[target]
    if lib != "numpy" and importlib.util.find_spec(lib) is None:
        return f"{lib} is not installed"
    if target in ("torch", "jax"):
        mod = f"memcore.backends.{target}.realize"
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} does not exist"
        except ModuleNotFoundError as err:
            return str(err)
    return None


def _enable_x64():
    import jax

    jax.config.update("jax_enable_x64", True)


def as_backend_array(target: str, x: np.ndarray):
    """``x`` (numpy) as an array of ``target``'s library, same dtype."""
    lib = _LIBRARY.get(target, target)
    if lib == "numpy":
        return x
    if lib == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    if lib == "jax":
        _enable_x64()
        import jax.numpy as jnp

        return jnp.asarray(x)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def realize_float64(spec, params: dict, target: str):
    """The realized object of ``spec`` on ``target``, computing in float64."""
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    if target.startswith("reference"):
        return realize(spec, backend="reference", params=params)
    if target == "jax":
        _enable_x64()
    obj = realize(spec, backend=target, params=params)
    if target == "torch" and hasattr(obj, "double"):
        obj = obj.double()
    return obj


def initial_state(obj, target: str):
    """None, except where a backend's streaming state needs its cache length up front (JAX's
    fixed-shape caches)."""
    if target == "jax":
        return obj.init_state(BATCH, max_len=LENGTH)
    return None


def _input(spec, seed: int = 0):
    rng = np.random.default_rng(seed)
    if isinstance(spec, S.Model):
        return rng.integers(0, spec.vocab_size, size=(BATCH, LENGTH))
    return rng.standard_normal((BATCH, LENGTH, spec.d_model))


def verify(targets=None, cases=None, log=None) -> list[Row]:
    """Run the checks; returns one row per (case, target, check)."""
    targets = TARGETS if targets is None else tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"targets must be among {TARGETS}, got {t!r}")
    cases = CASES if cases is None else cases
    rows: list[Row] = []
    for name, spec in cases.items():
        params = init(spec, seed=0, dtype=np.float64)
        x_np = _input(spec)
        reference = realize_float64(spec, params, "reference/numpy")
        for target in targets:
            reason = target_available(target)
            if reason is not None:
                rows.append(Row(name, target, "all", "skipped", detail=reason))
                continue
            tol = TOLERANCE["reference"] if target.startswith("reference") else \
                TOLERANCE["float64"]
            start = time.perf_counter()
            try:
                obj = realize_float64(spec, params, target)
                x = as_backend_array(target, x_np)
                s0 = initial_state(obj, target)
                results = [check_forms_agree(obj, x, s0, tolerance=tol),
                           check_split_agrees(obj, x, splits=(1, 5, LENGTH - 1), state=s0,
                                              tolerance=tol)]
                if target != "reference/numpy":
                    results.append(check_outputs_agree(obj, reference, x, s0, tolerance=tol,
                                                       ref_x=x_np))
            except Exception as err:  # a crash is a failed check, reported with its cause
                rows.append(Row(name, target, "all", "error",
                                detail=f"{type(err).__name__}: {err}"))
                if log is not None:
                    log(traceback.format_exc())
                continue
            for res in results:
                rows.append(Row(name, target, res.name, "ok" if res.passed else "FAIL",
                                res.error, res.tolerance, res.where))
            if log is not None:
                log(f"{name} on {target}: {time.perf_counter() - start:.2f}s")
    return rows


__all__ = ["TARGETS", "CASES", "Row", "verify", "as_backend_array", "realize_float64",
           "target_available"]
