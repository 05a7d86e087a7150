"""Bad input to the reference's realized layers and models (numpy arrays): dtypes, ranks,
widths, batch 0, states that are mutated, truncated or from another spec or batch, and
parameters that are missing, extra, misshapen, integer or not arrays. T = 0 gives an empty
output and leaves the state as it was."""

from __future__ import annotations

import numpy as np
import pytest

import memcore
from tests.fuzz.inputs import LAYERS, MODEL, Adapter, layer_cases, model_cases, params64


class Reference(Adapter):
    backend = "reference"


AD = Reference()
CASES = [pytest.param(fn, exc, pattern, id=cid)
         for cid, fn, exc, pattern in layer_cases(AD) + model_cases(AD)]


@pytest.mark.parametrize("fn,exc,pattern", CASES)
def test_bad_input(fn, exc, pattern, limited):
    limited(fn, exc, pattern)


@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_sequence_gives_empty_output(name):
    spec = LAYERS[name]
    layer = memcore.realize(spec, params=params64(spec))
    x = np.random.default_rng(0).standard_normal((2, 5, 6))
    y0, fresh, aux = layer.forward_aux(x[:, :0])
    assert y0.shape == (2, 0, 6) and y0.dtype == x.dtype and fresh["pos"] == 0
    assert (aux is None) == (spec.kind != "bmojo") and (aux is None or float(aux) == 0.0)
    y, state = layer(x[:, :3], fresh)
    y_empty, same = layer(x[:, :0], state)
    assert y_empty.shape == (2, 0, 6) and same is state
    y_rest, _ = layer(x[:, 3:], same)
    whole, _ = layer(x)
    np.testing.assert_allclose(np.concatenate([y, y_rest], axis=1), whole, rtol=1e-10)


def test_empty_tokens_give_empty_logits():
    model = memcore.realize(MODEL, params=params64(MODEL))
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    logits, state = model(tokens[:, :0])
    assert logits.shape == (2, 0, MODEL.vocab_size) and state["pos"] == 0
    _, state = model(tokens)
    logits, same = model(tokens[:, :0], state)
    assert logits.shape == (2, 0, MODEL.vocab_size) and same is state
    with pytest.raises(ValueError, match=r"state\['layers'\] must hold 2 layer states"):
        model(tokens[:, :0], dict(state, layers=state["layers"][:1]))
