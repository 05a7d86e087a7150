"""float32 realizations vs the float64 reference on the same (float32-representable)
parameters and inputs: relative RMSE <= 1e-5 (DESIGN 6), states kept in float32."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jaxcheck import F32_RMSE, LAYER_CASES, inputs, params64, ref_forward, rel_rmse
from memcore.backends.jax.realize import realize

from memcore import spec as S

CASES = ["transformer_full", "transformer_window", "mamba", "bmojo_f", "bmojo", "mosaic",
         "mosaic_capacity", "persistent"]


def _f32(params):
    return {k: v.astype(np.float32) for k, v in params.items()}


@pytest.mark.parametrize("name", CASES)
def test_float32_layer_within_rmse(name):
    spec = LAYER_CASES[name]
    p32 = _f32(params64(spec))
    x32 = inputs(spec, 2, 9).astype(np.float32)
    y_ref, s_ref, _ = ref_forward(spec, {k: v.astype(np.float64) for k, v in p32.items()},
                                  x32.astype(np.float64))
    y, state = realize(spec, p32)(jnp.asarray(x32))
    assert y.dtype == jnp.float32
    assert all(a.dtype in (jnp.float32, jnp.int32) for a in state.arrays.values())
    assert rel_rmse(y, y_ref) <= F32_RMSE


def test_float32_model_within_rmse():
    spec = S.jamba(6, 2, pattern="MA", vocab_size=7, d_state=2, window=3)
    p32 = _f32(params64(spec))
    tokens = inputs(spec, 2, 9)
    logits_ref, _, _ = ref_forward(spec, {k: v.astype(np.float64) for k, v in p32.items()},
                                   tokens)
    logits, _ = realize(spec, p32)(jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    assert rel_rmse(logits, logits_ref) <= F32_RMSE
