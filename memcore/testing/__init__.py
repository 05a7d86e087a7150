"""Property checks and hypothesis strategies for memcore's contract (DESIGN section 1).

The checks (``check_forms_agree``, ``check_split_agrees``, ``check_outputs_agree``) work on
any object with memcore's call and step protocol, so an implementation of a realization outside
memcore can be checked against the reference. The strategies (``memcore.testing.strategies``)
need hypothesis and load on first use.
"""

from __future__ import annotations

from .checks import (
    TOLERANCE,
    CheckResult,
    check_forms_agree,
    check_outputs_agree,
    check_split_agrees,
    compare,
    fold_steps,
    relative_error,
    relative_rmse,
    state_arrays,
    to_numpy,
)
from .verification import CASES, as_backend_array, realize_float64, verify

__all__ = [
    "TOLERANCE", "CheckResult", "check_forms_agree", "check_outputs_agree", "check_split_agrees",
    "compare", "fold_steps", "relative_error", "relative_rmse", "state_arrays", "to_numpy",
    "CASES", "as_backend_array", "realize_float64", "verify", "strategies",
]


def __getattr__(name):
    if name == "strategies":
        import importlib

        return importlib.import_module("memcore.testing.strategies")
    raise AttributeError(f"module 'memcore.testing' has no attribute {name!r}")
