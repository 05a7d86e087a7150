"""The hypothesis strategies draw valid, awkward specs and matching inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

import memcore
from memcore.testing import check_forms_agree
from memcore.testing import strategies as mst


@given(mst.layer_specs(), mst.data())
def test_layer_specs_are_valid_and_inputs_fit(spec, data):
    assert memcore.spec.from_json(spec.to_json()) == spec
    x = data.draw(mst.sequences(spec, max_len=9))
    assert x.ndim == 3 and x.shape[-1] == spec.d_model and 1 <= x.shape[1] <= 9
    assert x.dtype == np.float64


@given(mst.model_specs(), mst.data())
def test_model_specs_are_valid_and_tokens_fit(spec, data):
    tokens = data.draw(mst.sequences(spec, max_len=5))
    assert tokens.ndim == 2
    assert tokens.min() >= 0 and tokens.max() < spec.vocab_size
    assert len({layer.d_model for layer in spec.layers}) == 1


@settings(max_examples=10)
@given(mst.layer_specs(kinds=("bmojo",)), mst.data())
def test_strategies_drive_a_property_check(spec, data):
    x = data.draw(mst.sequences(spec, max_len=10))
    layer = memcore.realize(spec, params=memcore.init(spec, 0, dtype=np.float64))
    check_forms_agree(layer, x).raise_if_failed()
