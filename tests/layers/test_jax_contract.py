"""The layer contract of the JAX ``layers/`` modules: ``init_state(spec, batch, dtype)``,
``forward(spec, params, x, state, *, implementation) -> (y, state, aux)`` and
``step(spec, params, x_t, state) -> (y_t, state, aux)``, one module per ``spec.layer``, and
the realized layer built on them (float64, <= 1e-9)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jaxcheck import F64_RTOL, inputs, params64, rel_err
from memcore.backends.jax.layers import module
from memcore.backends.jax.realize import realize

from memcore import spec as S

SPECS = [S.transformer(4, 2, window=2), S.mamba(4, d_state=2), S.bmojo_f(4, 2, 2, d_state=2),
         S.bmojo(4, 2, 2, chunk=2, select=1, capacity=2, d_state=2), S.mosaic(4, 2, capacity=3),
         S.persistent(4, 2, 3)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.kind for s in SPECS])
def test_module_forms_are_the_realized_forms(spec):
    m = module(spec)
    assert m.__name__.endswith("layers." + spec.layer)
    p = {k: jnp.asarray(v) for k, v in params64(spec).items()}
    x = jnp.asarray(inputs(spec, 2, 5))
    layer = realize(spec, p)
    state = m.init_state(spec, 2, jnp.float64)
    assert int(state["pos"]) == 0 and state["pos"].dtype == jnp.int32
    y, s1, aux = m.forward(spec, p, x, state, implementation="jax")
    want, s_want, aux_want = layer.forward_aux(x)
    assert rel_err(y, want) <= F64_RTOL
    assert int(s1["pos"]) == 5 and set(s1) - {"pos"} == set(s_want.arrays)
    assert (aux is None) == (aux_want is None) == (spec.kind != "bmojo")
    y_t, s2, _ = m.step(spec, p, x[:, 0], state)
    want_t, _ = layer.step(x[:, 0], layer.init_state(2, dtype=jnp.float64))
    assert rel_err(y_t, want_t) <= F64_RTOL
    assert int(s2["pos"]) == 1


def test_a_spec_without_a_layer_module_is_refused():
    with pytest.raises(TypeError, match=r"spec must be a memcore layer spec"):
        module(S.SelectiveScanSpec(4, 2))
