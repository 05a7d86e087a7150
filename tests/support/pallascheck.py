"""Comparison helpers shared by the Pallas kernel tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TOL = {jnp.float64: 1e-9, jnp.float32: 1e-4, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
ON_GPU = any(d.platform == "gpu" for d in jax.devices())
gpu = pytest.mark.skipif(not ON_GPU, reason="compiled Pallas needs a GPU; the interpreted "
                                            "tests in this file are the CPU twins")


def rel_rmse(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    if not np.isfinite(got).all():
        return float("inf")  # NaN never passes
    err = np.sqrt(np.mean((got - want) ** 2))
    scale = np.sqrt(np.mean(want ** 2))
    return float(err / scale) if scale > 0 else float(err)


def check(name, got, want, dtype):
    e = rel_rmse(got, want)
    assert e <= TOL[dtype], f"{name}: relative RMSE {e:.3e} > {TOL[dtype]:.0e}"
