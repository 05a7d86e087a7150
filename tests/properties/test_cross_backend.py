"""Cross-backend property: for drawn specs, parameters and inputs, the torch and JAX backends
agree with each other and with the reference, in both forms (DESIGN contract 3)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings

import memcore
from memcore.testing import (
    TOLERANCE,
    check_forms_agree,
    check_outputs_agree,
    fold_steps,
    relative_error,
)
from memcore.testing import strategies as mst
from memcore.testing.verification import as_backend_array, realize_float64

MISSING = [lib for lib in ("torch", "jax") if importlib.util.find_spec(lib) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING}")


def _jax_state(obj, x):
    return obj.init_state(x.shape[0], max_len=x.shape[1])


def _all(spec, x_np):
    params = memcore.init(spec, seed=3, dtype=np.float64)
    objs = {t: realize_float64(spec, params, t) for t in ("reference/numpy", "torch", "jax")}
    xs = {t: as_backend_array(t, x_np) for t in objs}
    return objs, xs


def _check_all(spec, x_np):
    objs, xs = _all(spec, x_np)
    ref, torch_l, jax_l = objs["reference/numpy"], objs["torch"], objs["jax"]
    s_jax = _jax_state(jax_l, x_np)
    tol = TOLERANCE["float64"]
    # Each backend against the reference, and the two backends against each other.
    check_outputs_agree(torch_l, ref, xs["torch"], ref_x=x_np, tolerance=tol).raise_if_failed()
    check_outputs_agree(jax_l, ref, xs["jax"], s_jax, ref_x=x_np,
                        tolerance=tol).raise_if_failed()
    check_outputs_agree(torch_l, jax_l, xs["torch"], None, s_jax, ref_x=xs["jax"],
                        tolerance=tol).raise_if_failed()
    # Streaming forms: each folds to its own parallel form, and the folds agree across backends.
    check_forms_agree(torch_l, xs["torch"], tolerance=tol).raise_if_failed()
    check_forms_agree(jax_l, xs["jax"], s_jax, tolerance=tol).raise_if_failed()
    y_torch, _ = fold_steps(torch_l, xs["torch"])
    y_jax, _ = fold_steps(jax_l, xs["jax"], s_jax)
    assert relative_error(y_torch, y_jax) <= tol


@settings(max_examples=6)
@given(mst.layer_specs(max_heads=2, max_head_dim=3, max_window=4, max_chunk=4,
                       max_capacity=3, max_state=2), mst.data())
def test_layers_agree_across_backends(spec, data):
    x = data.draw(mst.sequences(spec, max_len=9))
    _check_all(spec, x)


@settings(max_examples=3)
@given(mst.model_specs(max_layers=2), mst.data())
def test_models_agree_across_backends(spec, data):
    tokens = data.draw(mst.sequences(spec, max_len=7))
    _check_all(spec, tokens)
