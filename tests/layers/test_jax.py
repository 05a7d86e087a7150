"""JAX layers vs the reference on the same float64 parameters (<= 1e-9): parallel form,
streaming form (one lax.scan over step), split calls (including splits inside a chunk and
T = 1), outputs, final states and the bmojo aux loss."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jaxcheck import (
    F64_RTOL,
    LAYER_CASES,
    assert_states_close,
    check_parallel_form,
    inputs,
    realized,
    ref_forward,
    rel_err,
    scan_steps,
)

IDS = list(LAYER_CASES)
T = 7  # not a multiple of any chunk, longer than every window


@pytest.fixture(params=IDS)
def case(request):
    return realized(LAYER_CASES[request.param])


def test_parallel_matches_reference(case):
    spec, params, layer = case
    check_parallel_form(spec, params, layer, inputs(spec, 2, T))


def test_streaming_scan_matches_reference(case):
    spec, params, layer = case
    x = inputs(spec, 2, T, seed=1)
    y_ref, s_ref, _ = ref_forward(spec, params, x)
    state = layer.init_state(2, max_len=T, dtype=jnp.float64)
    y, state = scan_steps(layer, jnp.asarray(x), state)
    assert int(state.pos) == T
    assert rel_err(y, y_ref) <= F64_RTOL
    assert_states_close(layer.to_reference_state(state), s_ref)


def test_split_calls_match_whole(case):
    """Pieces of 1, 3 and 3 tokens: T = 1, T < W, splits inside a chunk; the last piece starts
    from the reference's state converted to a JAX state."""
    spec, params, layer = case
    x = inputs(spec, 2, T, seed=2)
    y_ref, s_ref, _ = ref_forward(spec, params, x)
    _, s4_ref, _ = ref_forward(spec, params, x[:, :4])
    state = layer.init_state(2, max_len=T, dtype=jnp.float64)
    y1, state = layer(jnp.asarray(x[:, :1]), state)
    y2, state = layer(jnp.asarray(x[:, 1:4]), state)
    assert rel_err(y1, y_ref[:, :1]) <= F64_RTOL
    assert rel_err(y2, y_ref[:, 1:4]) <= F64_RTOL
    assert_states_close(layer.to_reference_state(state), s4_ref)
    state = layer.from_reference_state(s4_ref, max_len=T)
    y3, state = layer(jnp.asarray(x[:, 4:]), state)
    assert rel_err(y3, y_ref[:, 4:]) <= F64_RTOL
    assert_states_close(layer.to_reference_state(state), s_ref)
