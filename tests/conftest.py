"""Shared test setup: float64 everywhere (JAX needs x64 switched on before any array exists),
and hypothesis profiles sized for CI's 2 cores."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

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
