"""Bad input to the torch backend's modules: the shared layer and model cases (torch tensors
and torch states), and what only torch has (numpy where a tensor belongs, devices, dtypes
against the parameters', in-place steps, generation arguments). T = 0 gives an empty output and
leaves the state as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import memcore
from tests.fuzz.inputs import LAYERS, MODEL, Adapter, D, layer_cases, model_cases, params64


class Torch(Adapter):
    backend = "torch"
    not_array = r"must be a torch\.Tensor.*got"
    int_dtype = torch.int32

    def arr(self, a):
        return torch.from_numpy(np.array(a))

    def cast(self, a, dtype):
        return a.to(getattr(torch, np.dtype(dtype).name))


AD = Torch()


def _x(shape=(2, 5, D), dtype=torch.float64):
    return torch.ones(shape, dtype=dtype)


def _torch_cases():
    bmojo, model = LAYERS["bmojo"], MODEL
    tok = torch.ones((2, 3), dtype=torch.int64)

    def numpy_in_state():
        state = AD.state(bmojo, 2)
        return AD.layer(bmojo)(_x(), dict(state, k=state["k"].numpy()))

    def inplace_with_grad():
        layer = AD.layer(bmojo)
        return layer.step(_x((2, D)), layer.init_state(2), inplace=True)

    return [
        ("x-numpy", lambda: AD.layer(bmojo)(np.ones((2, 5, D))), TypeError,
         r"x must be a torch.Tensor, got ndarray"),
        ("x-float32-against-float64-params", lambda: AD.layer(bmojo)(_x(dtype=torch.float32)),
         TypeError, r"x has dtype torch.float32, but the parameters have dtype torch.float64"),
        ("x-on-meta", lambda: AD.layer(bmojo)(_x().to("meta")), ValueError,
         r"x is on device meta, but the parameters are on cpu"),
        ("state-numpy-array", numpy_in_state, TypeError,
         r"state\['k'\] must be a torch.Tensor, got numpy.ndarray"),
        ("step-inplace-with-grad", inplace_with_grad, ValueError,
         r"step\(\.\.\., inplace=True\) .* call it under torch.no_grad\(\)"),
        ("init-state-dtype-string", lambda: AD.layer(bmojo).init_state(1, dtype="float64"),
         TypeError, r"init_state: dtype must be a floating torch.dtype"),
        ("logits-to-keep-negative", lambda: AD.layer(model)(tok, logits_to_keep=-1), ValueError,
         r"logits_to_keep must be an int >= 0"),
        ("generate-empty-prompt", lambda: AD.layer(model).generate(tok[:, :0], 2), ValueError,
         r"generate: prompt must hold at least one token"),
        ("generate-negative-count", lambda: AD.layer(model).generate(tok, -1), ValueError,
         r"max_new_tokens must be a non-negative int"),
        ("generate-negative-temperature",
         lambda: AD.layer(model).generate(tok, 1, temperature=-1.0), ValueError,
         r"temperature must be a float >= 0"),
        ("generate-generator-type",
         lambda: AD.layer(model).generate(tok, 1, temperature=1.0, generator=0), TypeError,
         r"generator must be a torch.Generator"),
        ("realize-dtype-int", lambda: memcore.realize(bmojo, backend="torch", dtype=torch.int32),
         TypeError, r"dtype must be a floating torch.dtype"),
        ("realize-unknown-option", lambda: memcore.realize(bmojo, backend="torch", compile=True),
         TypeError, r"unknown options \['compile'\]"),
        ("params-torch-int",
         lambda: memcore.realize(bmojo, backend="torch", params=dict(
             params64(bmojo), **{"q_proj.weight": torch.ones((D, D), dtype=torch.int64)})),
         TypeError, r"params\['q_proj.weight'\] must be a floating-point array"),
    ]


CASES = [pytest.param(fn, exc, pattern, id=cid) for cid, fn, exc, pattern in
         layer_cases(AD) + model_cases(AD) + _torch_cases()]


@pytest.mark.parametrize("fn,exc,pattern", CASES)
def test_bad_input(fn, exc, pattern, limited):
    limited(fn, exc, pattern)


@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_sequence_gives_empty_output(name):
    spec = LAYERS[name]
    layer = memcore.realize(spec, backend="torch", params=params64(spec))
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y0, fresh, aux = layer.forward_aux(x[:, :0])
    assert y0.shape == (2, 0, D) and y0.dtype == x.dtype and fresh["pos"] == 0
    assert (aux is None) == (spec.kind != "bmojo") and (aux is None or float(aux) == 0.0)
    y, state = layer(x[:, :3], fresh)
    y_empty, same = layer(x[:, :0], state)
    assert y_empty.shape == (2, 0, D) and same is state
    y_rest, _ = layer(x[:, 3:], same)
    whole, _ = layer(x)
    torch.testing.assert_close(torch.cat([y, y_rest], dim=1), whole, rtol=1e-10, atol=1e-12)


def test_empty_tokens_give_empty_logits():
    model = memcore.realize(MODEL, backend="torch", params=params64(MODEL))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    logits, state = model(tokens[:, :0])
    assert logits.shape == (2, 0, MODEL.vocab_size) and state["pos"] == 0
    _, state = model(tokens)
    logits, same = model(tokens[:, :0], state, logits_to_keep=1)
    assert logits.shape == (2, 0, MODEL.vocab_size) and same is state
