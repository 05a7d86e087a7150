"""``memcore.ops`` routes JAX arrays to ``memcore.backends.jax.<primitive>``, every function."""

from __future__ import annotations

import importlib

import pytest

from memcore import ops

jax = pytest.importorskip("jax")


@pytest.mark.parametrize("name", sorted(ops.PRIMITIVE_OF))
def test_memcore_ops_routes_jax_arrays_here(name):
    module = importlib.import_module(f"memcore.backends.jax.{ops.PRIMITIVE_OF[name]}")
    assert ops.route(name, "jax") is getattr(module, name), name
