"""Bad input raises a clear error naming the argument; state conversion round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcheck import LAYER_CASES, inputs, params64, ref_forward
from memcore.backends.jax.realize import realize
from memcore.backends.jax.state import State

import memcore
from memcore import spec as S

SPEC = S.bmojo(4, 2, window=2, chunk=2, select=1, capacity=2, d_state=2)


@pytest.fixture(scope="module")
def layer():
    return realize(SPEC, params64(SPEC))


def test_input_errors_name_the_argument(layer):
    with pytest.raises(ValueError, match=r"x has width 5, expected d_model=4"):
        layer(jnp.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match=r"x must be \[batch, T, d_model\]"):
        layer(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"x_t must be \[batch, d_model\]"):
        layer.step(jnp.zeros((1, 3, 4)), layer.init_state(1))
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
        layer(jnp.zeros((1, 3, 4), jnp.int32))
    # empty in, empty out: T = 0 gives y [B, 0, D] and the state as it was
    _, state = layer(jnp.ones((1, 3, 4)))
    y, same = layer(jnp.zeros((1, 0, 4)), state)
    assert y.shape == (1, 0, 4) and same is state
    with pytest.raises(ValueError, match=r"x has batch size 0"):
        layer(jnp.zeros((0, 3, 4)))


def test_state_errors(layer):
    other = realize(S.bmojo_f(4, 2, window=2, d_state=2))
    with pytest.raises(ValueError, match=r"state was made for another spec"):
        layer(jnp.zeros((1, 3, 4)), other.init_state(1))
    with pytest.raises(ValueError, match=r"state\['k'\] has shape \(1, 2, 2, 2\), expected "
                                         r"\(2, 2, 2, 2\)"):
        layer(jnp.zeros((2, 3, 4)), layer.init_state(1))
    with pytest.raises(ValueError, match=r"has dtype float32, expected float64"):
        layer(jnp.zeros((1, 3, 4), jnp.float64), layer.init_state(1, dtype=jnp.float32))
    with pytest.raises(TypeError, match=r"state must be a memcore JAX State"):
        layer(jnp.zeros((1, 3, 4)), {"pos": 0})
    with pytest.raises(ValueError, match=r"batch must be a positive int, got 0"):
        layer.init_state(0)


def test_growing_cache_respects_max_len_and_grows_without_it():
    full = realize(S.transformer(4, 2, window=None))
    state = full.init_state(1, max_len=4)
    _, state = full(jnp.zeros((1, 3, 4)), state)
    with pytest.raises(ValueError, match=r"max_len=4 tokens.*pos=3, tokens=2"):
        full(jnp.zeros((1, 2, 4)), state)
    # without max_len the cache starts empty and grows, as torch's does; step with no state too
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 4)))
    y_whole, _ = full(x)
    state = full.init_state(1)
    assert state.growable and state.arrays["k"].shape[2] == 0
    y_a, state = full(x[:, :2], state)
    y_t, state = full.step(x[:, 2], state)
    y_b, state = full(x[:, 3:], state)
    got = jnp.concatenate([y_a, y_t[:, None], y_b], axis=1)
    assert float(jnp.max(jnp.abs(got - y_whole))) <= 1e-9
    y0, _ = full.step(x[:, 0])
    assert float(jnp.max(jnp.abs(y0 - y_whole[:, 0]))) <= 1e-9


def test_model_and_realize_errors():
    spec = S.model([S.mamba(4, d_state=2)], vocab_size=5)
    model = realize(spec)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=5\)"):
        model(jnp.asarray([[1, 5]]))
    with pytest.raises(TypeError, match=r"tokens must hold integer token ids, got dtype float"):
        model(jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"max_new_tokens must be a non-negative int, got -1"):
        model.generate(jnp.asarray([[1]]), -1)
    none, state = model.generate(jnp.asarray([[1, 2]]), 0)
    assert none.shape == (1, 0) and int(state.pos) == 2
    with pytest.raises(TypeError, match=r"unknown options \['window'\]"):
        realize(spec, window=3)
    bad = memcore.init(spec)
    bad["embed.weight"] = bad["embed.weight"][:, :3]
    with pytest.raises(ValueError, match=r"embed.weight: expected shape \(5, 4\), got \(5, 3\)"):
        realize(spec, bad)
    assert memcore.realize(spec, backend="jax").__class__.__name__ == "JaxModel"


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_reference_state_round_trip(name):
    spec = LAYER_CASES[name]
    params = params64(spec)
    _, ref, _ = ref_forward(spec, params, inputs(spec, 2, 5))
    layer = realize(spec, params)
    state = layer.from_reference_state(ref, max_len=8)
    assert isinstance(state, State) and state.pos.shape == () and int(state.pos) == 5
    back = layer.to_reference_state(state)
    assert set(back) == set(ref) and back["spec_id"] == ref["spec_id"] and back["pos"] == 5
    for key in ref:
        if key not in ("pos", "spec_id"):
            assert back[key].shape == ref[key].shape and back[key].dtype == ref[key].dtype, key
            np.testing.assert_array_equal(back[key], ref[key], err_msg=key)
    again = layer.from_reference_state(back, max_len=8)
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), again, state)
    assert all(jax.tree_util.tree_leaves(same))
    with pytest.raises(ValueError, match=r"was made for another spec"):
        layer.from_reference_state(dict(ref, spec_id="0" * 16), max_len=8)
