"""Hypothesis over layer specs and shapes: two split calls of the JAX layer equal the
reference's one call (float64, <= 1e-9), outputs and final states. Few examples, since every
new spec or shape is a compile."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxcheck import F64_RTOL, assert_states_close, params64, ref_forward, rel_err
from memcore.backends.jax.realize import realize

from memcore import spec as S


@st.composite
def layer_specs(draw):
    H, E = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D = H * E
    kind = draw(st.sampled_from(["transformer", "mamba", "bmojo_f", "bmojo", "mosaic",
                                 "persistent"]))
    if kind == "transformer":
        return S.transformer(D, H, window=draw(st.one_of(st.none(), st.integers(1, 4))),
                             positions=draw(st.sampled_from(["rope", "none"])))
    if kind == "mamba":
        return S.mamba(D, d_state=draw(st.integers(1, 2)), d_conv=draw(st.integers(1, 4)))
    if kind == "mosaic":
        return S.mosaic(D, H, capacity=draw(st.one_of(st.none(), st.integers(1, 4))))
    if kind == "persistent":
        return S.persistent(D, H, slots=draw(st.integers(1, 3)))
    kw = dict(d_model=D, n_heads=H, window=draw(st.integers(1, 4)), d_state=2,
              fading=draw(st.booleans()), tie_fading=draw(st.booleans()),
              positions=draw(st.sampled_from(["rope", "none"])))
    if kind == "bmojo_f":
        return S.bmojo_f(**kw)
    chunk = draw(st.integers(1, 4))
    select = draw(st.one_of(st.just(0), st.just(chunk), st.integers(0, chunk)))
    return S.bmojo(chunk=chunk, select=select, capacity=draw(st.integers(0, 3)), **kw)


@settings(max_examples=8)
@given(spec=layer_specs(), B=st.integers(1, 2), T=st.integers(2, 9), data=st.data())
def test_split_jax_calls_equal_reference(spec, B, T, data):
    a = data.draw(st.integers(1, T - 1), label="split")
    seed = data.draw(st.integers(0, 3), label="seed")
    params = params64(spec, seed=seed)
    x = np.random.default_rng(seed).standard_normal((B, T, spec.d_model))
    y_ref, s_ref, aux_ref = ref_forward(spec, params, x)
    layer = realize(spec, params)
    state = layer.init_state(B, max_len=T, dtype=jnp.float64)
    y1, state = layer(jnp.asarray(x[:, :a]), state)
    y2, state, _ = layer.forward_aux(jnp.asarray(x[:, a:]), state)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), y_ref) <= F64_RTOL
    assert_states_close(layer.to_reference_state(state), s_ref)
