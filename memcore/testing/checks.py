"""The contract's checks as plain functions, usable on any implementation of a realization.

A *layer* here is anything with ``layer(x, state) -> (y, state)`` and
``layer.step(x_t, state) -> (y_t, state)`` over arrays of one library (numpy, torch, JAX, ...),
where ``x`` is ``[B, T, ...]`` and ``x_t`` is ``x[:, t]``. States may be nested dicts, tuples and
arrays, or objects with a ``to_reference_state()`` method; they are compared array by array after
conversion to numpy. Every check returns a :class:`CheckResult` (worst error found, the tolerance,
and where the worst error was) and raises nothing unless asked to with ``result.raise_if_failed()``.

DESIGN section 6 fixes the tolerances: reference forms 1e-10 (float64), backend vs reference
1e-9 (float64), relative RMSE 1e-5 (float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TOLERANCE = {"reference": 1e-10, "float64": 1e-9, "float32": 1e-5, "bfloat16": 1e-2,
             "float16": 1e-2}


@dataclass
class CheckResult:
    """Outcome of one check: ``error`` is the worst relative error over everything compared."""

    name: str
    error: float
    tolerance: float
    where: str = ""
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        # NaN never passes: `nan <= tol` is False.
        return bool(self.error <= self.tolerance)

    def raise_if_failed(self) -> CheckResult:
        if not self.passed:
            raise AssertionError(f"{self.name}: error {self.error:.3e} > tolerance "
                                 f"{self.tolerance:.1e} at {self.where or '?'}")
        return self

    def __str__(self):
        status = "ok" if self.passed else "FAIL"
        return f"{self.name}: {status} (error {self.error:.2e}, tolerance {self.tolerance:.0e})"


def to_numpy(a) -> np.ndarray:
    """Any array (numpy, torch, JAX, Array API) or Python scalar as a numpy array."""
    if hasattr(a, "detach"):  # torch: leave the graph and the device first
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
    return np.asarray(a)


def state_arrays(state, prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a state into ``{path: numpy array}``; the spec fingerprint is left out."""
    if hasattr(state, "to_reference_state"):
        state = state.to_reference_state()
    out: dict[str, np.ndarray] = {}
    if isinstance(state, dict):
        for key in sorted(state):
            if key == "spec_id":
                continue
            out.update(state_arrays(state[key], f"{prefix}{key}."))
    elif isinstance(state, (tuple, list)):
        for i, item in enumerate(state):
            out.update(state_arrays(item, f"{prefix}{i}."))
    elif state is not None:
        out[prefix[:-1]] = to_numpy(state)
    return out


def layer_state_arrays(layer, state) -> dict[str, np.ndarray]:
    """``state_arrays`` of a state in the reference's format: a backend whose native state
    differs (fixed-shape JAX caches) converts it with ``layer.to_reference_state(state)``."""
    if hasattr(layer, "to_reference_state") and state is not None:
        state = layer.to_reference_state(state)
    return {"state." + k: v for k, v in state_arrays(state).items()}


def _as_pair(actual, expected):
    a = to_numpy(actual).astype(np.float64)
    b = to_numpy(expected).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: actual {a.shape}, expected {b.shape}")
    return a, b


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (absolute where expected is all zero).

    Shapes must match exactly: a silent broadcast would hide a wrong shape.
    """
    a, b = _as_pair(actual, expected)
    if a.size == 0:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan if not np.array_equal(a, b, equal_nan=False) else 0.0
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    return diff / scale if scale > 0 else diff


def relative_rmse(actual, expected) -> float:
    """||actual - expected||_2 / ||expected||_2, the float32 and bf16 measure of DESIGN 6."""
    a, b = _as_pair(actual, expected)
    if a.size == 0:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan
    den = float(np.sqrt(np.sum(b * b)))
    num = float(np.sqrt(np.sum((a - b) ** 2)))
    return num / den if den > 0 else num


def compare(name: str, actual: dict, expected: dict, tolerance: float,
            measure=relative_error) -> CheckResult:
    """Compare two ``{label: array}`` dicts key by key; keys must match."""
    if set(actual) != set(expected):
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        return CheckResult(name, math.inf, tolerance,
                           f"keys differ (missing {missing}, unexpected {extra})")
    worst, where, per_key = 0.0, "", {}
    for key in sorted(expected):
        try:
            err = measure(actual[key], expected[key])
        except ValueError as exc:
            return CheckResult(name, math.inf, tolerance, f"{key}: {exc}")
        per_key[key] = err
        if not err <= worst:  # also catches NaN
            worst, where = err, key
            if math.isnan(err):
                break
    return CheckResult(name, worst, tolerance, where, per_key)


def _concat_time(ys) -> np.ndarray:
    return np.concatenate([to_numpy(y) for y in ys], axis=1)


def fold_steps(layer, x, state=None):
    """Run ``layer.step`` over every t of ``x``; returns (y [B, T, ...] as numpy, final state)."""
    ys = []
    for t in range(x.shape[1]):
        y_t, state = layer.step(x[:, t], state)
        ys.append(to_numpy(y_t)[:, None])
    return np.concatenate(ys, axis=1), state


def check_forms_agree(layer, x, state=None, tolerance: float = TOLERANCE["reference"],
                      measure=relative_error) -> CheckResult:
    """Contract 1: folding ``step`` over x gives the parallel form's outputs and final state."""
    y_par, s_par = layer(x, state)
    y_seq, s_seq = fold_steps(layer, x, state)
    actual = {"y": y_seq, **layer_state_arrays(layer, s_seq)}
    expected = {"y": to_numpy(y_par), **layer_state_arrays(layer, s_par)}
    return compare("forms", actual, expected, tolerance, measure)


def check_split_agrees(layer, x, splits=None, state=None,
                       tolerance: float = TOLERANCE["reference"],
                       measure=relative_error) -> CheckResult:
    """Contract 2: ``layer(x[:, :a])`` then ``layer(x[:, a:], state)`` equals ``layer(x)`` for
    every split ``a`` in ``splits`` (default: every a in 1 .. T-1)."""
    T = x.shape[1]
    splits = range(1, T) if splits is None else splits
    y_full, s_full = layer(x, state)
    expected = {"y": to_numpy(y_full), **layer_state_arrays(layer, s_full)}
    worst = CheckResult("split", 0.0, tolerance)
    for a in splits:
        if not 0 < a < T:
            raise ValueError(f"check_split_agrees: splits must lie in 1..{T - 1}, got {a}")
        y1, s1 = layer(x[:, :a], state)
        y2, s2 = layer(x[:, a:], s1)
        actual = {"y": _concat_time([y1, y2]), **layer_state_arrays(layer, s2)}
        res = compare("split", actual, expected, tolerance, measure)
        if not res.error <= worst.error:
            worst = res
            worst.where = f"a={a}: {res.where}"
            if math.isnan(res.error):
                break
    return worst


def check_outputs_agree(layer, reference, x, state=None, ref_state=None,
                        tolerance: float = TOLERANCE["float64"], measure=relative_error,
                        ref_x=None) -> CheckResult:
    """Contract 3: ``layer`` and ``reference`` give the same outputs and final states on the
    same input (``ref_x``: the input in the reference's array library, default ``x``)."""
    y, s = layer(x, state)
    y_ref, s_ref = reference(x if ref_x is None else ref_x, ref_state)
    actual = {"y": to_numpy(y), **layer_state_arrays(layer, s)}
    expected = {"y": to_numpy(y_ref), **layer_state_arrays(reference, s_ref)}
    return compare("vs reference", actual, expected, tolerance, measure)


__all__ = [
    "TOLERANCE", "CheckResult", "to_numpy", "state_arrays", "layer_state_arrays",
    "relative_error", "relative_rmse",
    "compare", "fold_steps", "check_forms_agree", "check_split_agrees", "check_outputs_agree",
]
