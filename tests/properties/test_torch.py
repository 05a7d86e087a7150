"""Hypothesis over specs, shapes, splits and the backend's own tiling (scan chunk and group
sizes, attention query blocks): the torch layers and models agree with the reference in
float64, in both forms and across a split."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memcore.backends.torch import banded as attention
from memcore.backends.torch import selective_scan as scan
from memcore.spec.reference import layers as RL
from memcore.spec.reference import model as RM
from torchcheck import F64, assert_states_close, model_steps, rel, steps

import memcore
from memcore.testing import strategies as mst


@contextlib.contextmanager
def tiling(chunk: int, group: int, block: int):
    """Small tiles make short test sequences cross chunk, group and block boundaries."""
    saved = scan.CHUNK, scan.GROUP_ELEMENTS, attention.MIN_BLOCK
    scan.CHUNK, scan.GROUP_ELEMENTS, attention.MIN_BLOCK = chunk, group, block
    try:
        yield
    finally:
        scan.CHUNK, scan.GROUP_ELEMENTS, attention.MIN_BLOCK = saved


tilings = st.tuples(st.integers(1, 20), st.sampled_from([1, 50, 1 << 24]), st.integers(1, 20))


@given(spec=mst.layer_specs(), data=mst.data(), tiles=tilings, seed=st.integers(0, 3))
def test_layers_match_reference(spec, data, tiles, seed):
    params = memcore.init(spec, seed, dtype=np.float64)
    layer = memcore.realize(spec, backend="torch", params=params)
    x = torch.from_numpy(data.draw(mst.sequences(spec, max_len=30)))
    T = x.shape[1]
    a = data.draw(st.integers(0, T - 1))
    y_ref, s_ref, aux_ref = RL.forward_aux(spec, params, x)
    with tiling(*tiles):
        y, state, aux = layer.forward_aux(x)
        assert rel(y, y_ref) <= F64
        assert_states_close(state, s_ref)
        if aux_ref is not None:
            assert rel(aux, aux_ref) <= F64
        if a:  # split at a drawn point, then stream the rest
            y1, s1 = layer(x[:, :a])
            y2, s2 = layer(x[:, a:], s1)
            assert rel(torch.cat([y1, y2], 1), y_ref) <= F64
            assert_states_close(s2, s_ref)
    y_s, s_s, _ = steps(layer, x[:, a:], RL.forward(spec, params, x[:, :a])[1] if a else None)
    assert rel(y_s, y_ref[:, a:]) <= F64
    assert_states_close(s_s, s_ref)


@settings(max_examples=10)
@given(spec=mst.model_specs(), data=mst.data(), tiles=tilings)
def test_models_match_reference(spec, data, tiles):
    params = memcore.init(spec, 0, dtype=np.float64)
    model = memcore.realize(spec, backend="torch", params=params)
    tok = torch.from_numpy(data.draw(mst.sequences(spec, max_len=12)))
    ref, s_ref = RM.forward(spec, params, tok)
    with tiling(*tiles):
        logits, state = model(tok)
    assert rel(logits, ref) <= F64
    assert_states_close(state, s_ref)
    y_s, s = model_steps(model, tok)
    assert rel(y_s, ref) <= F64
    assert_states_close(s, s_ref)
