"""``memcore.realize(spec, "reference")``: the realized objects' call, step and init_state, and
the errors of realize and init."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from refcheck import REALIZATIONS, params64

import memcore
from memcore import spec as S

SPEC = S.bmojo(6, 2, window=2, chunk=3, select=1, capacity=2, d_state=2)
P = params64(SPEC)
X = np.zeros((2, 5, 6))
any_spec = st.one_of([s for _, s in REALIZATIONS])


@given(spec=any_spec, seed=st.integers(0, 100))
def test_reference_backend_realizes_with_init_params(spec, seed):
    """memcore.realize(spec, "reference") uses init(spec, seed) by default and runs both forms
    through the functional reference; its init_state is float32 numpy."""
    from refcheck import fold, forward, inputs, is_model

    layer = memcore.realize(spec, backend="reference", seed=seed)
    assert layer.spec == spec
    p = memcore.init(spec, seed)
    x = inputs(spec, 1, 3, seed)
    x = x if is_model(spec) else x.astype(np.float32)
    state0 = layer.init_state(1)
    y, state = layer(x, state0)
    want, want_state = forward(spec, p, x)
    assert np.array_equal(y, want)
    assert state["pos"] == 3 and state["spec_id"] == spec.spec_id
    ys, _ = fold(spec, p, x)
    y_t, _ = layer.step(x[:, 0], state0)
    assert np.array_equal(y_t, ys[0])
    again = memcore.realize(spec, backend="reference", params=p)
    assert np.array_equal(again(x)[0], y)


def test_state_dtype_mismatch_says_how_to_make_one():
    layer = memcore.realize(SPEC, backend="reference", params=P)
    with pytest.raises(ValueError, match=r"has dtype float32, expected float64.*like=x"):
        layer(X, layer.init_state(2, dtype=np.float32))


def test_init_state_dtype_and_like():
    """The realized layer's state follows ``dtype`` (numpy or torch names) or ``like``; both at
    once is refused; a float64 state made that way runs a float64 input."""
    torch = pytest.importorskip("torch")
    layer = memcore.realize(SPEC, backend="reference", params=P)
    assert layer.init_state(2)["k"].dtype == P["q_proj.weight"].dtype
    for dtype in (np.float64, "float64", torch.float64):
        state = layer.init_state(2, dtype=dtype)
        assert state["k"].dtype == np.float64
    y, _ = layer(X, layer.init_state(2, dtype=np.float64))
    assert np.array_equal(y, layer(X)[0])
    with pytest.raises(ValueError, match=r"init_state: give like or dtype, not both"):
        layer.init_state(2, like=X, dtype=np.float64)
    with pytest.raises(TypeError, match=r"init_state: dtype must name a floating dtype"):
        layer.init_state(2, dtype=object())


def test_params_needing_grad_with_numpy_input():
    """Torch parameters that require grad cannot meet a numpy input: the error names the
    parameter and both libraries, not torch's own message alone."""
    torch = pytest.importorskip("torch")
    params = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    layer = memcore.realize(SPEC, backend="reference", params=params)
    with pytest.raises(TypeError, match=r"params\['[a-z_.]+'\] is a torch.Tensor and cannot join "
                                        r"an input of numpy.ndarray"):
        layer(X)
    y, _ = layer(torch.tensor(X))  # the same parameters with a torch input keep their graph
    assert y.requires_grad


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'nope'"):
        memcore.realize(SPEC, backend="nope")
    with pytest.raises(TypeError, match=r"backend must be a backend name"):
        memcore.realize(SPEC, backend=3)


def test_realize_needs_a_spec():
    with pytest.raises(TypeError, match=r"spec must be a memcore layer or model spec"):
        memcore.realize("bmojo")


def test_non_finite_params_when_checked():
    p = dict(P, **{"q_proj.weight": np.full((6, 6), np.nan)})
    with pytest.raises(ValueError, match=r"q_proj.weight \(36 non-finite values\)"):
        memcore.realize(SPEC, params=p, check=True)


def test_init_arguments():
    with pytest.raises(ValueError, match=r"seed must be a non-negative int, got -1"):
        memcore.init(SPEC, seed=-1)
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype, got int64"):
        memcore.init(SPEC, dtype=np.int64)
