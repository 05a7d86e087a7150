"""DESIGN contract 1 and 2 on the reference, float64: parallel == fold(step) (outputs and every
array of the final state) and forward(x[:a]) then forward(x[a:], state) == forward(x)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from refcheck import (
    MAX_T,
    assert_close,
    assert_fold_matches,
    assert_split_matches,
    assert_states_equal,
    each_realization,
    fold,
    forward,
    inputs,
    is_model,
    params64,
)

# T = 1, T < W, T not a multiple of the chunk, chunk > T all come from small T against the
# drawn windows and chunks; T = 1 is also drawn on its own often.
lengths = st.one_of(st.just(1), st.integers(1, MAX_T))


@each_realization
@given(data=st.data())
def test_parallel_equals_folded_step(spec_st, data):
    spec = data.draw(spec_st, label="spec")
    T = data.draw(lengths, label="T")
    B = data.draw(st.integers(1, 2), label="B")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    params = params64(spec, seed)
    x = inputs(spec, B, T, seed)
    y, state = forward(spec, params, x)
    assert_fold_matches(spec, params, x, y, state)


@each_realization
@given(data=st.data())
def test_split_forward_equals_forward(spec_st, data):
    spec = data.draw(spec_st, label="spec")
    T = data.draw(st.integers(2, MAX_T), label="T")
    B = data.draw(st.integers(1, 2), label="B")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    params = params64(spec, seed)
    x = inputs(spec, B, T, seed)
    y, state = forward(spec, params, x)
    # Every split a, so splits inside a chunk, at chunk ends and at window edges all occur.
    for a in range(1, T):
        assert_split_matches(spec, params, x, a, y, state)


@each_realization
@given(data=st.data())
def test_three_way_mix_of_forms(spec_st, data):
    """forward on a prefix, a few steps, then forward on the rest: the state crosses forms both
    ways, so each form must read the other's state."""
    spec = data.draw(spec_st, label="spec")
    T = data.draw(st.integers(3, MAX_T), label="T")
    a = data.draw(st.integers(1, T - 2), label="a")
    b = data.draw(st.integers(a + 1, T - 1), label="b")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    params = params64(spec, seed)
    x = inputs(spec, 1, T, seed)
    y, state = forward(spec, params, x)
    y1, s = forward(spec, params, x[:, :a])
    ys, s = fold(spec, params, x[:, a:b], s)
    y3, s = forward(spec, params, x[:, b:], s)
    got = np.concatenate([y1, np.stack(ys, axis=1), y3], axis=1)
    assert_close(got, y, f"y (forward {a}, step to {b}, forward)")
    assert_states_equal(s, state, "final state")


@each_realization
@given(data=st.data())
def test_float32_follows_float64(spec_st, data):
    """float32 inputs and parameters accumulate in float32 and return float32; the result stays
    within DESIGN's float32 bound (relative RMSE <= 1e-5) of the float64 one, in both forms.
    A float16 input returns float16 with a float32 state."""
    spec = data.draw(spec_st, label="spec")
    T = data.draw(st.integers(1, 8), label="T")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    # memcore.init's values as they are: perturbed mosaic key scales sharpen the softmax to
    # logits of ~1e3, where float32 rounding alone moves y by more than 1e-5.
    params = params64(spec, seed, jitter=0.0)
    x = inputs(spec, 2, T, seed)
    y64, _ = forward(spec, params, x)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    x32 = x if is_model(spec) else x.astype(np.float32)
    y32, s32 = forward(spec, p32, x32)
    ys, _ = fold(spec, p32, x32)
    assert y32.dtype == np.float32
    for got, what in ((y32, "parallel"), (np.stack(ys, axis=1), "streaming")):
        if not np.any(y64):  # mosaic at T = 1 reads nothing: both must be exactly 0
            assert not np.any(got), f"float32 {what}: nonzero where float64 is 0"
            continue
        rmse = np.sqrt(np.mean((got - y64) ** 2)) / np.sqrt(np.mean(y64 ** 2))
        assert rmse <= 1e-5, f"float32 {what} vs float64: relative RMSE {rmse:.2e}"
    floats = [v for v in _arrays(s32) if v.dtype.kind == "f"]
    assert all(v.dtype == np.float32 for v in floats)
    if not is_model(spec):
        y16, s16 = forward(spec, params, x.astype(np.float16))
        assert y16.dtype == np.float16
        assert all(v.dtype == np.float32 for v in _arrays(s16) if v.dtype.kind == "f")


def _arrays(state):
    if isinstance(state, dict):
        return [a for v in state.values() for a in _arrays(v)]
    if isinstance(state, tuple):
        return [a for v in state for a in _arrays(v)]
    return [] if isinstance(state, (int, str)) else [state]


def _grows(spec) -> bool:
    """Only an unbounded window or an unbounded associative memory may grow the state."""
    layers = list(spec.layers) if is_model(spec) else [spec]
    return any((hasattr(s, "window") and s.window is None)
               or (hasattr(s, "capacity") and s.capacity is None) for s in layers)


@each_realization
@given(data=st.data())
def test_streaming_state_size_is_constant_unless_unbounded(spec_st, data):
    spec = data.draw(spec_st, label="spec")
    T = data.draw(st.integers(2, MAX_T), label="T")
    params = params64(spec, 0)
    x = inputs(spec, 1, T, 0)
    _, s1 = forward(spec, params, x[:, :1])
    _, sT = forward(spec, params, x)
    shapes1 = [a.shape for a in _arrays(s1)]
    shapesT = [a.shape for a in _arrays(sT)]
    if not _grows(spec):
        assert shapes1 == shapesT, f"bounded state changed size: {shapes1} -> {shapesT}"
    else:
        assert sum(np.prod(s) for s in shapesT) > sum(np.prod(s) for s in shapes1)
