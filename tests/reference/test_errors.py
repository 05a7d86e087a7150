"""Bad input raises a clear error that names the argument (and, for shapes, what was expected)."""

from __future__ import annotations

import numpy as np
import pytest
from memcore.spec.params import check_params
from memcore.spec.reference import layers as L
from memcore.spec.reference import model as M
from memcore.spec.reference import ops as R
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
    with pytest.raises(ValueError, match=r"x must hold at least one token, got T=0"):
        L.forward(SPEC, P, np.zeros((2, 0, 6)))


def test_integer_x():
    with pytest.raises(TypeError, match=r"x must be a floating array, got dtype int"):
        L.forward(SPEC, P, np.zeros((2, 5, 6), dtype=np.int64))


def test_model_tokens():
    spec = S.model([S.transformer(4, 2)], vocab_size=5)
    p = params64(spec)
    with pytest.raises(TypeError, match=r"tokens must hold integer token ids, got dtype float"):
        M.forward(spec, p, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, T\]"):
        M.forward(spec, p, np.zeros((3,), dtype=np.int64))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=5\)"):
        M.forward(spec, p, np.array([[0, 5]]))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=5\)"):
        M.step(spec, p, np.array([-1]))


# --- states ---------------------------------------------------------------------------------

def test_state_from_another_spec():
    other = S.bmojo(6, 2, window=3, chunk=3, select=1, capacity=2, d_state=2)
    _, state = L.forward(other, params64(other), X)
    with pytest.raises(ValueError, match=r"state was made for another spec"):
        L.forward(SPEC, P, X, state)
    with pytest.raises(ValueError, match=r"state was made for another spec"):
        L.step(SPEC, P, X[:, 0], state)


def test_model_state_from_another_spec():
    a = S.model([S.transformer(4, 2)], vocab_size=5)
    b = S.model([S.transformer(4, 2, window=2)], vocab_size=5)
    _, state = M.forward(a, params64(a), np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"state was made for another spec"):
        M.forward(b, params64(b), np.array([[1, 2]]), state)


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


# --- backends and specs -----------------------------------------------------------------------

def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'nope'"):
        memcore.realize(SPEC, backend="nope")
    with pytest.raises(TypeError, match=r"backend must be a backend name"):
        memcore.realize(SPEC, backend=3)


def test_realize_needs_a_spec():
    with pytest.raises(TypeError, match=r"spec must be a memcore layer or model spec"):
        memcore.realize("bmojo")


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda: S.transformer(8, 2, window=-1), ValueError, r"transformer: window must be >= 1"),
    (lambda: S.transformer(8, 2, window=0), ValueError, r"window must be >= 1, got 0"),
    (lambda: S.bmojo_f(8, 2, window=-3), ValueError, r"bmojo_f: window must be >= 1"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=4, capacity=2), ValueError,
     r"bmojo: select must be <= 3, got 4"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=-1, capacity=2), ValueError,
     r"select must be >= 0"),
    (lambda: S.bmojo(8, 2, 4, chunk=0, select=0, capacity=2), ValueError,
     r"chunk must be >= 1"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=1, capacity=-1), ValueError,
     r"capacity must be >= 0"),
    (lambda: S.transformer(7, 2), ValueError, r"d_model=7 is not divisible by n_heads=2"),
    (lambda: S.mosaic(6, 4), ValueError, r"d_model=6 is not divisible by n_heads=4"),
    (lambda: S.transformer(8, 2, positions="alibi"), ValueError,
     r"positions must be one of \('rope', 'none'\), got 'alibi'"),
    (lambda: S.bmojo_f(8, 2, 4, positions="abs"), ValueError, r"positions must be one of"),
    (lambda: S.transformer(8, 2, window=True), TypeError, r"window must be an int or None, "
                                                          r"got True \(bool\)"),
    (lambda: S.mamba(True), TypeError, r"mamba: d_model must be an int, got True"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=True, capacity=2), TypeError,
     r"select must be an int, got True"),
    (lambda: S.mosaic(8, 2, capacity=False), TypeError, r"capacity must be an int or None"),
    (lambda: S.bmojo_f(8, 2, 4, fading=1), TypeError, r"fading must be a bool, got 1"),
    (lambda: S.bmojo_f(8, 2, 4, tie_fading="yes"), TypeError, r"tie_fading must be a bool"),
    (lambda: S.bmojo_f(8, 2, 4, d_state=0), ValueError, r"bmojo_f: d_state must be >= 1"),
    (lambda: S.mamba(8, dt_rank="big"), TypeError, r"dt_rank must be an int"),
    (lambda: S.persistent(8, 2, slots=0), ValueError, r"slots must be >= 1"),
    (lambda: S.transformer(8.0, 2), TypeError, r"d_model must be an int, got 8.0"),
    (lambda: S.jamba(8, 2, pattern="MXA"), ValueError,
     r"jamba: pattern must be a non-empty string of 'M' and 'A', got 'MXA'"),
    (lambda: S.jamba(8, 2, pattern=""), ValueError, r"pattern must be a non-empty string"),
    (lambda: S.jamba(8, 2, pattern=None), ValueError, r"pattern must be a non-empty string"),
    (lambda: S.jamba(8, 2, n_layers=0), ValueError, r"n_layers must be >= 1"),
    (lambda: S.model([], 5), ValueError, r"layers must be a non-empty sequence"),
    (lambda: S.model([S.transformer(4, 2), S.mamba(6)], 5), ValueError,
     r"layers\[1\].d_model=6 differs from layers\[0\].d_model=4"),
    (lambda: S.model(["mamba"], 5), TypeError, r"layers\[0\] must be a layer spec"),
    (lambda: S.model([S.mamba(4)], 0), ValueError, r"vocab_size must be >= 1"),
    (lambda: S.model([S.mamba(4)], 5, ffn="moe"), ValueError, r"ffn must be 'mlp'"),
    (lambda: S.model([S.mamba(4)], 5, norm="batch"), ValueError, r"norm must be one of"),
    (lambda: S.model([S.mamba(4)], 5, ffn=S.persistent(6, 2, 3)), ValueError,
     r"ffn.d_model=6 differs"),
])
def test_invalid_spec_arguments(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_spec_json_errors():
    with pytest.raises(ValueError, match=r"unknown kind 'nope'"):
        S.from_json('{"kind": "nope"}')
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        S.from_json('{"kind": "mamba", "d_model": 4, "colour": 1}')
    with pytest.raises(ValueError, match=r"not valid JSON"):
        S.from_json("{")
    with pytest.raises(ValueError, match=r"window must be >= 1"):
        S.from_json('{"kind": "transformer", "d_model": 4, "n_heads": 2, "window": -2}')


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


def test_non_finite_params_when_checked():
    p = dict(P, **{"q_proj.weight": np.full((6, 6), np.nan)})
    with pytest.raises(ValueError, match=r"q_proj.weight \(36 non-finite values\)"):
        memcore.realize(SPEC, params=p, check=True)


def test_init_arguments():
    with pytest.raises(ValueError, match=r"seed must be a non-negative int, got -1"):
        memcore.init(SPEC, seed=-1)
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype, got int64"):
        memcore.init(SPEC, dtype=np.int64)


# --- ops ----------------------------------------------------------------------------------------

def test_selective_scan_argument_errors():
    u = np.zeros((1, 4, 5))
    A = -np.ones((4, 2))
    Bm = np.zeros((1, 2, 5))
    with pytest.raises(ValueError, match=r"selective_scan: delta must have u's shape"):
        R.selective_scan(u, np.zeros((1, 4, 4)), A, Bm, Bm)
    with pytest.raises(ValueError, match=r"selective_scan: A must be \[channels=4, d_state\]"):
        R.selective_scan(u, u, -np.ones((3, 2)), Bm, Bm)
    with pytest.raises(ValueError, match=r"selective_scan: C must be \[batch=1, d_state=2, T\]"):
        R.selective_scan(u, u, A, Bm, np.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match=r"B must be .*groups dividing 4"):
        R.selective_scan(u, u, A, np.zeros((1, 3, 2, 5)), Bm)
    with pytest.raises(ValueError, match=r"D must be \[channels=4\]"):
        R.selective_scan(u, u, A, Bm, Bm, D=np.zeros(3))
    with pytest.raises(ValueError, match=r"initial_state must be \[batch=1, channels=4, "
                                         r"d_state=2\]"):
        R.selective_scan(u, u, A, Bm, Bm, initial_state=np.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match=r"selective_state_update: u must be"):
        R.selective_state_update(np.zeros((1, 4, 2)), u, u, A, Bm, Bm)


def test_leaky_average_argument_errors():
    with pytest.raises(ValueError, match=r"leaky_average: log_decay must be \[heads=2\]"):
        R.leaky_average(np.zeros((1, 3, 2, 4)), np.zeros(3))
    with pytest.raises(ValueError, match=r"leaky_average: k must be \[batch, T, heads, "
                                         r"head_dim\]"):
        R.leaky_average(np.zeros((3, 2, 4)), np.zeros(2))


def test_windowed_attention_argument_errors():
    q = np.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"windowed_attention: k must have q's shape"):
        R.windowed_attention(q, np.zeros((1, 3, 2, 3)), q)
    with pytest.raises(ValueError, match=r"give both fading_k and fading_v"):
        R.windowed_attention(q, q, q, window=2, fading_k=q)
    with pytest.raises(ValueError, match=r"window must be an int when fading keys are given"):
        R.windowed_attention(q, q, q, fading_k=q, fading_v=q)


def test_readout_argument_errors():
    with pytest.raises(ValueError, match=r"associative_readout: k and v must be"):
        R.associative_readout(np.zeros((1, 3, 2, 4)), np.zeros((1, 3, 2, 3)))
    with pytest.raises(ValueError, match=r"persistent_readout: mem_k and mem_v must be "
                                         r"\[H=2, P, E=4\]"):
        R.persistent_readout(np.zeros((1, 2, 4)), np.zeros((2, 5, 3)), np.zeros((2, 5, 3)))


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
