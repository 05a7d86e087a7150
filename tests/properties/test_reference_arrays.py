"""The reference runs unchanged on numpy, torch and JAX arrays: the fold and split properties
hold on each library, and the three give the same numbers (float64, <= 1e-10)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from refcheck import (
    assert_close,
    assert_fold_matches,
    assert_split_matches,
    assert_states_equal,
    each_realization,
    forward,
    inputs,
    is_model,
    params64,
)

from memcore import spec as S

MAX_T = 8

# JAX compiles every op for every new shape (tens of milliseconds each on CPU), so drawing
# shapes would cost minutes: JAX runs one fixed model that holds every kind of layer, all of
# one width (D = 6, two heads of odd width 3) so compiled ops are shared between layers.
JAX_T, JAX_SPLIT = 4, 2  # T not a multiple of the chunk 3; the split falls inside a chunk
JAX_CASES = [
    ("every_layer_kind", S.model(
        # bmojo holds the Mamba block, both windows and the store; the transformer and the
        # second mosaic grow their caches.
        [S.bmojo(6, 2, window=2, chunk=3, select=2, capacity=3, d_state=2, tie_fading=False),
         S.transformer(6, 2), S.mosaic(6, 2, capacity=3), S.mosaic(6, 2)], 5,
        ffn="persistent")),
]


def _library(name):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        pytest.skip(f"{name} is not importable: {err}")


def _convert(lib_name, x):
    """A numpy array as an array of ``lib_name``, same dtype."""
    if lib_name == "numpy":
        return x
    if lib_name == "torch":
        torch = _library("torch")
        return torch.from_numpy(np.ascontiguousarray(x))
    jnp = _library("jax.numpy")
    import jax

    if x.dtype == np.float64 and not jax.config.jax_enable_x64:
        pytest.skip("JAX runs without x64; float64 comparisons need jax_enable_x64")
    return jnp.asarray(x)


def _library_of(a) -> str:
    return type(a).__module__.split(".")[0]


def _assert_library(lib_name, y, state):
    """Outputs and state arrays stay in the input's library (no silent trip through numpy)."""
    want = {"numpy": "numpy", "torch": "torch", "jax": "jax"}[lib_name]
    got = _library_of(y)
    assert got.startswith(want) or (want == "jax" and got.startswith("jaxlib")), (
        f"output is a {type(y)}, expected a {lib_name} array")

    def walk(s):
        if isinstance(s, dict):
            for v in s.values():
                walk(v)
        elif isinstance(s, (tuple, list)):
            for v in s:
                walk(v)
        elif not isinstance(s, (int, str)):
            mod = _library_of(s)
            assert mod.startswith(want) or (want == "jax" and mod.startswith("jaxlib")), (
                f"state array is a {type(s)}, expected a {lib_name} array")

    walk(state)


@pytest.mark.parametrize("lib_name", ["torch"])
@each_realization
@given(data=st.data())
def test_forms_agree_on_each_library_and_match_numpy(lib_name, spec_st, data):
    _library(lib_name)
    spec = data.draw(spec_st, label="spec")
    T = data.draw(st.integers(2, MAX_T), label="T")
    a = data.draw(st.integers(1, T - 1), label="split")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    params = params64(spec, seed)
    x_np = inputs(spec, 2 if not is_model(spec) else 1, T, seed)
    y_np, state_np = forward(spec, params, x_np)

    x = _convert(lib_name, x_np)
    y, state = forward(spec, params, x)
    _assert_library(lib_name, y, state)
    assert_close(y, y_np, f"y ({lib_name} vs numpy)")
    assert_states_equal(state, state_np, f"state ({lib_name} vs numpy)")

    assert_fold_matches(spec, params, x, y_np, state_np, f" on {lib_name}")
    assert_split_matches(spec, params, x, a, y_np, state_np, f" on {lib_name}")


@each_realization
@given(data=st.data())
def test_library_params_match_numpy_params(spec_st, data):
    """Parameters given as torch tensors (not numpy) give the same numbers: the reference
    converts whichever it is given."""
    torch = _library("torch")
    spec = data.draw(spec_st, label="spec")
    T = data.draw(st.integers(1, MAX_T), label="T")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    params = params64(spec, seed)
    x_np = inputs(spec, 1, T, seed)
    y_np, state_np = forward(spec, params, x_np)
    tparams = {k: torch.from_numpy(v) for k, v in params.items()}
    y, state = forward(spec, tparams, torch.from_numpy(x_np))
    assert_close(y, y_np, "y (torch params vs numpy params)")
    assert_states_equal(state, state_np, "state (torch params vs numpy params)")


@pytest.mark.parametrize("spec", [c for _, c in JAX_CASES], ids=[n for n, _ in JAX_CASES])
def test_forms_agree_on_jax_and_match_numpy_and_torch(spec):
    _library("jax")
    params = params64(spec, 3)
    x_np = inputs(spec, 1, JAX_T, 3)
    y_np, state_np = forward(spec, params, x_np)
    x = _convert("jax", x_np)
    y, state = forward(spec, params, x)
    _assert_library("jax", y, state)
    assert_close(y, y_np, "y (jax vs numpy)")
    assert_states_equal(state, state_np, "state (jax vs numpy)")
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        torch = None  # the torch comparison runs in the test above when torch is there
    if torch is not None:
        y_t, state_t = forward(spec, params, torch.from_numpy(x_np))
        assert_close(y, y_t, "y (jax vs torch)")
        assert_states_equal(state, state_t, "state (jax vs torch)")

    assert_fold_matches(spec, params, x, y_np, state_np, " on jax")
    assert_split_matches(spec, params, x, JAX_SPLIT, y_np, state_np, " on jax")
