"""Shared test setup: float64 everywhere (JAX needs x64 switched on before any array exists),
and hypothesis profiles sized for CI's 2 cores."""

from __future__ import annotations

import os
import pathlib
import sys

from hypothesis import HealthCheck, settings

# Tests import with --import-mode=importlib (test files in different folders may share a
# name); each folder's helper modules (kcheck, torchcheck, jaxcheck, plain, ...) are found here.
_HERE = pathlib.Path(__file__).resolve().parent
# The repository root too: with importlib imports a test module is named tests.<folder>.<file>,
# and processes a test spawns re-import it by that name.
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))
for _sub in sorted(p for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
    if str(_sub) not in sys.path:
        sys.path.insert(0, str(_sub))

try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # JAX is optional; tests that need it skip with the reason
    pass

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
