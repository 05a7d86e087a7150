"""Bad input to the JAX backend's modules: the shared layer and model cases (JAX arrays and
``State``s), and what only JAX has (fixed-shape caches, ``max_len``, another library's arrays,
generation arguments). T = 0 gives an empty output and leaves the state as it was."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from memcore.backends.jax.state import State

import memcore
from memcore import spec as S
from tests.fuzz.inputs import LAYERS, MODEL, Adapter, D, layer_cases, model_cases, params64


class Jax(Adapter):
    backend = "jax"
    not_state = r"state must be a memcore JAX State"
    not_state_exc = TypeError
    int_dtype = jnp.int32

    def arr(self, a):
        return jnp.asarray(a)

    def arrays(self, state):
        return dict(state.arrays)

    def replace(self, state, **arrays):
        return State(state.pos, {**state.arrays, **arrays}, state.spec_id, state.growable)

    def without(self, state, key):
        arrays = {k: v for k, v in state.arrays.items() if k != key}
        return State(state.pos, arrays, state.spec_id, state.growable)

    def with_pos(self, state, pos):
        return State(jnp.asarray(pos), state.arrays, state.spec_id, state.growable)

    def cast(self, a, dtype):
        return a.astype(dtype)


AD = Jax()


def _jax_cases():
    bmojo, full, model = LAYERS["bmojo"], LAYERS["transformer"], MODEL
    tok = jnp.ones((2, 3), jnp.int32)

    def torch_x():
        torch = pytest.importorskip("torch")
        return AD.layer(bmojo)(torch.ones((2, 5, D), dtype=torch.float64))

    return [
        ("x-torch", torch_x, TypeError, r"x must be a JAX or numpy array, got a torch array"),
        ("init-state-max-len-negative", lambda: AD.layer(full).init_state(1, max_len=-1),
         ValueError, r"max_len must be a positive int or None, got -1"),
        ("init-state-dtype-string", lambda: AD.layer(full).init_state(1, dtype="nonsense"),
         TypeError, r"init_state: dtype must be a floating dtype"),
        ("cache-beyond-max-len",
         lambda: AD.layer(full)(jnp.ones((1, 5, D)), AD.layer(full).init_state(1, max_len=4)),
         ValueError, r"the state's cache holds max_len=4 tokens"),
        ("state-pos-vector", lambda: AD.layer(bmojo)(jnp.ones((2, 5, D)), AD.with_pos(
            AD.state(bmojo, 2), jnp.zeros((1,), jnp.int32))), ValueError,
         r"state.pos must be a 0-d integer array"),
        ("realize-dtype-int", lambda: memcore.realize(bmojo, backend="jax", dtype=jnp.int32),
         TypeError, r"realize \(jax\): dtype must be a floating dtype"),
        ("realize-unknown-option", lambda: memcore.realize(bmojo, backend="jax", window=3),
         TypeError, r"unknown options \['window'\]"),
        ("generate-empty-prompt", lambda: AD.layer(model).generate(tok[:, :0], 2), ValueError,
         r"generate: prompt must hold at least one token"),
        ("generate-negative-count", lambda: AD.layer(model).generate(tok, -1), ValueError,
         r"max_new_tokens must be a non-negative int"),
        ("generate-sampling-without-key",
         lambda: AD.layer(model).generate(tok, 2, temperature=1.0), ValueError,
         r"temperature > 0 samples, which needs key="),
        ("from-reference-other-spec", lambda: AD.layer(bmojo).from_reference_state(
            memcore.realize(S.mamba(D)).init_state(1)), ValueError,
         r"ref_state was made for another spec"),
    ]


CASES = [pytest.param(fn, exc, pattern, id=cid) for cid, fn, exc, pattern in
         layer_cases(AD) + model_cases(AD) + _jax_cases()]


@pytest.mark.parametrize("fn,exc,pattern", CASES)
def test_bad_input(fn, exc, pattern, limited):
    limited(fn, exc, pattern)


@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_sequence_gives_empty_output(name):
    spec = LAYERS[name]
    layer = memcore.realize(spec, backend="jax", params=params64(spec))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, D)))
    y0, fresh, aux = layer.forward_aux(x[:, :0])
    assert y0.shape == (2, 0, D) and y0.dtype == x.dtype and int(fresh.pos) == 0
    assert (aux is None) == (spec.kind != "bmojo") and (aux is None or float(aux) == 0.0)
    y, same = layer(x[:, :0], fresh)
    assert y.shape == (2, 0, D) and same is fresh


def test_empty_tokens_give_empty_logits():
    model = memcore.realize(MODEL, backend="jax", params=params64(MODEL))
    logits, state = model(jnp.ones((2, 0), jnp.int32))
    assert logits.shape == (2, 0, MODEL.vocab_size) and int(state.pos) == 0
