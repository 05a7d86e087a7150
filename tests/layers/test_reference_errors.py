"""Bad input to a reference layer raises a clear error that names the argument (and, for shapes,
what was expected): inputs, states, parameters."""

from __future__ import annotations

import numpy as np
import pytest
from memcore.spec.params import check_params
from memcore.spec.reference import layers as L
from refcheck import params64

import memcore
from memcore import spec as S

SPEC = S.bmojo(6, 2, window=2, chunk=3, select=1, capacity=2, d_state=2)
P = params64(SPEC)
X = np.zeros((2, 5, 6))


# --- inputs ---------------------------------------------------------------------------------

def test_wrong_width():
    with pytest.raises(ValueError, match=r"x has width 7, expected d_model=6"):
        L.forward(SPEC, P, np.zeros((2, 5, 7)))
    with pytest.raises(ValueError, match=r"x_t has width 5, expected d_model=6"):
        L.step(SPEC, P, np.zeros((2, 5)))


def test_wrong_ndim():
    with pytest.raises(ValueError, match=r"x must be \[batch, T, d_model\].*got shape \(5, 6\)"):
        L.forward(SPEC, P, np.zeros((5, 6)))
    with pytest.raises(ValueError, match=r"x_t must be \[batch, d_model\].*got shape"):
        L.step(SPEC, P, np.zeros((2, 1, 6)))


def test_empty_sequence():
    # the functional form refuses T = 0; the realized layer returns an empty output
    with pytest.raises(ValueError, match=r"x must hold at least one token, got T=0"):
        L.forward(SPEC, P, np.zeros((2, 0, 6)))
    layer = memcore.realize(SPEC, params=P)
    _, state = layer(X)
    y, same, aux = layer.forward_aux(np.zeros((2, 0, 6)), state)
    assert y.shape == (2, 0, 6) and same is state and float(aux) == 0.0


def test_integer_x():
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int"):
        L.forward(SPEC, P, np.zeros((2, 5, 6), dtype=np.int64))


# --- states ---------------------------------------------------------------------------------

def test_state_from_another_spec():
    other = S.bmojo(6, 2, window=3, chunk=3, select=1, capacity=2, d_state=2)
    _, state = L.forward(other, params64(other), X)
    with pytest.raises(ValueError, match=r"state was made for another spec"):
        L.forward(SPEC, P, X, state)
    with pytest.raises(ValueError, match=r"state was made for another spec"):
        L.step(SPEC, P, X[:, 0], state)


def test_state_with_wrong_shape():
    _, state = L.forward(SPEC, P, X)
    bad = dict(state, k=state["k"][:, :, :1])
    with pytest.raises(ValueError, match=r"state\['k'\] has shape \(2, 2, 1, 3\), expected "
                                         r"\(2, 2, 2, 3\)"):
        L.forward(SPEC, P, X, bad)
    # a state for batch 2 used with batch 1
    with pytest.raises(ValueError, match=r"state\['\w+'\] has shape .* \(batch 1\)"):
        L.forward(SPEC, P, X[:1], state)


def test_state_with_wrong_dtype():
    _, state = L.forward(SPEC, P, X)
    bad = dict(state, ssm=state["ssm"].astype(np.float32))
    with pytest.raises(ValueError, match=r"state\['ssm'\] has dtype float32, expected float64"):
        L.forward(SPEC, P, X, bad)


def test_state_with_missing_or_extra_array():
    _, state = L.forward(SPEC, P, X)
    missing = {k: v for k, v in state.items() if k != "fk"}
    with pytest.raises(ValueError, match=r"state has arrays .*expects"):
        L.forward(SPEC, P, X, missing)
    with pytest.raises(ValueError, match=r"state has arrays .*expects"):
        L.forward(SPEC, P, X, dict(state, extra=state["k"]))


def test_state_with_bad_pos():
    _, state = L.forward(SPEC, P, X)
    for pos in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"state\['pos'\] must be a non-negative int"):
            L.forward(SPEC, P, X, dict(state, pos=pos))
    with pytest.raises(ValueError, match=r"state must be a memcore state dict"):
        L.forward(SPEC, P, X, {"k": state["k"]})


def test_init_state_batch():
    with pytest.raises(ValueError, match=r"batch must be a positive int, got 0"):
        L.init_state(SPEC, 0, X)


# --- parameters --------------------------------------------------------------------------------

def test_params_missing_entry():
    p = {k: v for k, v in P.items() if k != "q_proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['q_proj.weight'\]"):
        L.forward(SPEC, p, X)
    with pytest.raises(ValueError, match=r"missing \['q_proj.weight'\]"):
        memcore.realize(SPEC, params=p)


def test_params_extra_entry():
    with pytest.raises(ValueError, match=r"unexpected \['bias'\]"):
        L.forward(SPEC, dict(P, bias=np.zeros(6)), X)


def test_params_misshapen_entry():
    p = dict(P, **{"fading.A_log": np.zeros((12, 3))})
    with pytest.raises(ValueError, match=r"fading.A_log: expected shape \(12, 2\), "
                                         r"got \(12, 3\)"):
        L.forward(SPEC, p, X)
    with pytest.raises(ValueError, match=r"fading.A_log: expected shape"):
        check_params(SPEC, p)


def test_params_not_a_dict():
    with pytest.raises(TypeError, match=r"params must be a dict of arrays, got list"):
        L.forward(SPEC, list(P.values()), X)


@pytest.mark.parametrize("spec,keys,held", [
    (S.transformer(4, 2), ("k", "v"), 5),  # a KV cache holds every token seen
    (S.mosaic(4, 2), ("mem_k", "mem_v"), 4),  # every completed (key, value) pair
])
def test_growing_cache_length_must_match_pos(spec, keys, held):
    p = params64(spec)
    x = np.zeros((1, 5, 4))
    _, state = L.forward(spec, p, x)
    assert state[keys[0]].shape[2] == held
    bad = dict(state, **{k: state[k][:, :, :held - 1] for k in keys})
    pattern = rf"state\['{keys[0]}'\] has shape \(1, 2, {held - 1}, 2\), expected " \
              rf"\(1, 2, {held}, 2\)"
    with pytest.raises(ValueError, match=pattern):
        L.forward(spec, p, x, bad)
    with pytest.raises(ValueError, match=pattern):
        L.step(spec, p, x[:, 0], bad)
