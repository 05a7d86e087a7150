"""Bad input to the torch layers raises a clear error naming the argument, the expected and
the actual value: shapes, dtypes, devices, states from another spec, bad realize options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchcheck import LAYER_CASES, inputs

import memcore


@pytest.fixture(params=["bmojo", "mamba", "mosaic", "transformer_full", "persistent"])
def layer(request):
    spec = LAYER_CASES[request.param]
    return memcore.realize(spec, backend="torch", params=memcore.init(spec, 0, np.float64))


def test_input_shape_and_dtype(layer):
    D = layer.spec.d_model
    x = inputs(layer.spec, 2, 5)
    with pytest.raises(ValueError, match=rf"x must be \[batch, T, d_model\] with d_model={D}"):
        layer(x[0])
    with pytest.raises(ValueError, match=rf"width {D + 1}, expected d_model={D}"):
        layer(torch.zeros(2, 5, D + 1, dtype=torch.float64))
    # empty in, empty out: T = 0 gives y [B, 0, D] and leaves the state as it was
    _, state = layer(x)
    y, same = layer(x[:, :0], state)
    assert y.shape == (2, 0, D) and y.dtype == x.dtype and same is state
    with pytest.raises(ValueError, match=r"x has batch size 0"):
        layer(x[:0])
    with pytest.raises(TypeError, match="floating"):
        layer(x.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(x.numpy())
    with pytest.raises(ValueError, match=r"x_t must be \[batch, d_model\]"):
        layer.step(x)


def test_dtype_and_device_must_match_the_parameters(layer):
    x = inputs(layer.spec, 2, 5)
    with pytest.raises(TypeError, match="dtype torch.float32, but the parameters have dtype "
                                        "torch.float64"):
        layer(x.float())
    with pytest.raises(ValueError, match="device meta, but the parameters are on cpu"):
        layer(x.to("meta"))


def test_state_checks(layer):
    x = inputs(layer.spec, 2, 5)
    _, state = layer(x)
    other = memcore.realize(LAYER_CASES["bmojo_f"], backend="torch").init_state(2)
    with pytest.raises(ValueError, match="made for another spec"):
        layer(x, other)
    with pytest.raises(ValueError, match="memcore state dict"):
        layer(x, [state])
    with pytest.raises(ValueError, match=r"has shape .* expected .*\(batch 1\)"):
        layer(x[:1], state)
    key = next(k for k, v in state.items() if isinstance(v, torch.Tensor)
               and v.is_floating_point())
    with pytest.raises(ValueError, match=rf"state\['{key}'\] has dtype torch.float32, expected "
                                         "torch.float64"):
        layer(x, dict(state, **{key: state[key].float()}))
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match="expects"):
        layer(x, missing)
    with pytest.raises(ValueError, match=r"\['pos'\] must be a non-negative int"):
        layer(x, dict(state, pos=-1))
    with pytest.raises(ValueError, match="on device meta, but the input is on cpu"):
        layer(x, dict(state, **{key: state[key].to("meta")}))
    with pytest.raises(ValueError, match="batch must be a positive int"):
        layer.init_state(0)


def test_realize_checks():
    spec = LAYER_CASES["bmojo"]
    params = memcore.init(spec, 0)
    with pytest.raises(ValueError, match=r"missing \['q_proj.weight'\]"):
        memcore.realize(spec, backend="torch",
                        params={k: v for k, v in params.items() if k != "q_proj.weight"})
    bad = dict(params, **{"k_proj.weight": params["k_proj.weight"][:, :3]})
    with pytest.raises(ValueError, match=r"k_proj.weight: expected shape \(6, 6\), got \(6, 3\)"):
        memcore.realize(spec, backend="torch", params=bad)
    with pytest.raises(TypeError, match=r"unknown options \['compile'\]"):
        memcore.realize(spec, backend="torch", compile=True)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        memcore.realize(spec, backend="torch", dtype=torch.int32)
    layer = memcore.realize(spec, backend="torch", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    with pytest.raises(TypeError, match="layer or model spec"):
        memcore.backends.torch.realize.realize(spec.store)
