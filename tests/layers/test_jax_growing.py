"""Growing caches (transformer window=None, mosaic capacity=None) on the JAX backend: a first
call without a state, then calls needing more room than it built, regrow the cache outside
jit, as torch's caches grow: ``layer(x[:13])`` then ``layer(x[13:], state)`` equals one call
and the reference (float64, <= 1e-9), and so does the streaming form after them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jaxcheck import F64_RTOL, assert_states_close, inputs, params64, ref_forward, rel_err
from memcore.backends.jax.realize import realize

from memcore import spec as S

GROWING = {"transformer_full": S.transformer(6, 2, window=None),
           "transformer_full_norope": S.transformer(6, 3, window=None, positions="none"),
           "mosaic": S.mosaic(6, 2)}


@pytest.mark.parametrize("name", list(GROWING))
def test_split_after_a_call_without_state_regrows(name):
    spec = GROWING[name]
    params = params64(spec)
    x = inputs(spec, 2, 22, seed=3)
    y_ref, s_ref, _ = ref_forward(spec, params, x[:, :20])
    layer = realize(spec, params)
    y1, state = layer(jnp.asarray(x[:, :13]))
    assert state.growable
    y2, state = layer(jnp.asarray(x[:, 13:20]), state)
    assert int(state.pos) == 20
    assert rel_err(jnp.concatenate([y1, y2], axis=1), y_ref) <= F64_RTOL
    assert_states_close(layer.to_reference_state(state), s_ref)
    # the cache grew geometrically: the streaming form continues without another copy
    assert state.arrays["k" if "k" in state.arrays else "mem_k"].shape[2] >= 26
    y_all, _, _ = ref_forward(spec, params, x)
    for t in (20, 21):
        y_t, state = layer.step(jnp.asarray(x[:, t]), state)
        assert rel_err(y_t, y_all[:, t]) <= F64_RTOL, t


def test_a_state_with_max_len_keeps_its_room():
    # an explicit max_len fixes the state's shapes (a jitted loop over step relies on them)
    layer = realize(S.mosaic(4, 2))
    state = layer.init_state(1, max_len=4)
    assert not state.growable
    _, state = layer(jnp.zeros((1, 3, 4)), state)
    with pytest.raises(ValueError, match=r"max_len=4 tokens.*pos=3, tokens=3"):
        layer(jnp.zeros((1, 3, 4)), state)


def test_model_split_after_a_call_without_state_regrows():
    spec = S.model([S.transformer(6, 2, window=None), S.mosaic(6, 2)], vocab_size=7)
    params = params64(spec)
    tokens = inputs(spec, 2, 20, seed=4)
    logits_ref, s_ref, _ = ref_forward(spec, params, tokens)
    model = realize(spec, params)
    l1, state = model(jnp.asarray(tokens[:, :13]))
    l2, state = model(jnp.asarray(tokens[:, 13:]), state)
    assert rel_err(jnp.concatenate([l1, l2], axis=1), logits_ref) <= F64_RTOL
    assert_states_close(model.to_reference_state(state), s_ref)
    # generate continues the grown state past its room
    out, state = model.generate(jnp.asarray(tokens[:, :1]), 3, state=state)
    assert out.shape == (2, 3) and int(state.pos) == 21 + 2
    assert np.all(np.asarray(out) >= 0)
