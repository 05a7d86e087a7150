"""memcore.testing's checks pass on the reference and catch each kind of broken layer."""

from __future__ import annotations

import math

import numpy as np
import pytest

import memcore
from memcore.testing import (
    check_forms_agree,
    check_outputs_agree,
    check_split_agrees,
    relative_error,
    relative_rmse,
    state_arrays,
)

SPEC = memcore.spec.bmojo(6, 2, window=3, chunk=4, select=2, capacity=3, d_state=3)


def _layer(spec=SPEC, seed=0):
    return memcore.realize(spec, params=memcore.init(spec, seed, dtype=np.float64))


def _x(T=11, spec=SPEC):
    return np.random.default_rng(1).standard_normal((2, T, spec.d_model))


class StepOffByEps:
    """Streaming form adds eps to its output at t = 5: the parallel form does not."""

    def __init__(self, inner, eps):
        self.inner, self.eps = inner, eps

    def __call__(self, x, state=None):
        return self.inner(x, state)

    def step(self, x_t, state=None):
        y, state = self.inner.step(x_t, state)
        return (y + self.eps if state["pos"] == 6 else y), state


class ForgetsState:
    """Ignores the incoming state: correct on whole sequences, wrong when split."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, state=None):
        return self.inner(x, None)

    def step(self, x_t, state=None):
        return self.inner.step(x_t, state)


def test_reference_passes_every_check():
    layer, x = _layer(), _x()
    assert check_forms_agree(layer, x).passed
    res = check_split_agrees(layer, x)
    assert res.passed, res
    assert res.error < 1e-12
    assert check_outputs_agree(layer, _layer(), x).passed


def test_forms_check_catches_a_step_that_differs():
    res = check_forms_agree(StepOffByEps(_layer(), 1e-6), _x())
    assert not res.passed
    assert res.where == "y"
    assert res.error > 1e-8
    with pytest.raises(AssertionError, match="forms"):
        res.raise_if_failed()
    # A difference far below the tolerance passes: the check measures, it does not flag noise.
    assert check_forms_agree(StepOffByEps(_layer(), 1e-15), _x()).passed


def test_split_check_catches_a_layer_that_drops_its_state():
    res = check_split_agrees(ForgetsState(_layer()), _x())
    assert not res.passed
    assert res.where.startswith("a=")


def test_outputs_check_catches_other_parameters():
    res = check_outputs_agree(_layer(seed=0), _layer(seed=1), _x())
    assert not res.passed


def test_split_rejects_out_of_range_split():
    with pytest.raises(ValueError, match="splits"):
        check_split_agrees(_layer(), _x(T=5), splits=[5])


def test_relative_error_rejects_shape_mismatch_and_never_passes_nan():
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(np.zeros((2, 3)), np.zeros((3, 2)))
    assert math.isnan(relative_error(np.array([np.nan]), np.array([1.0])))
    assert math.isnan(relative_rmse(np.array([1.0, np.nan]), np.array([1.0, 1.0])))
    assert relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.2)
    assert relative_rmse(np.array([3.0, 0.0]), np.array([0.0, 4.0])) == pytest.approx(1.25)


def test_state_arrays_flattens_nested_states_without_the_fingerprint():
    spec = memcore.spec.jamba(6, 2, pattern="MA", vocab_size=7, d_state=2)
    model = _layer(spec)
    _, state = model(np.zeros((1, 3), dtype=np.int64), None)
    flat = state_arrays(state)
    assert "spec_id" not in " ".join(flat)
    assert flat["pos"] == 3
    assert flat["layers.0.ssm"].shape == (1, 12, 2)
    assert "layers.1.k" in flat
