"""DESIGN 6: causality holds for every value, finite or not, in the JAX backend.

A NaN or an infinity put into the input at position t (for the ops: into one of the op's own
inputs) must leave every parallel output before t finite and equal to the clean run's (float64,
<= 1e-12 relative), and the streaming fold and the split forward must equal the parallel form
wherever either is finite, with both non-finite at the same places (outputs and final states).

JAX compiles each function for each new shape, so every case has a fixed spec and length and the
split falls at T / 2 (both halves one shape): hypothesis draws the poisoned position, its value,
its channel (or the op's input and index), which keeps each case to a handful of compilations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import nonfinite
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxcheck import params64, scan_steps
from memcore.backends.jax import associative_readout as AR
from memcore.backends.jax import eidetic_store as ES
from memcore.backends.jax import leaky_average as LA
from memcore.backends.jax import selective_scan as SS
from memcore.backends.jax import windowed_readout as WR
from memcore.backends.jax.realize import realize
from nonfinite import POISONS, assert_prefix_clean
from nonfinite import poison as _poison

from memcore import spec as S

FORM_RTOL = 1e-10  # the forms against each other where finite (float64)
assert_same_where_finite = functools.partial(nonfinite.assert_same_where_finite, rtol=FORM_RTOL)
assert_states_match = functools.partial(nonfinite.assert_states_match, rtol=FORM_RTOL)
EXAMPLES = 20
T = 12  # every case's length; the split falls at T // 2

# --- comparisons ------------------------------------------------------------------------------


# --- layers and models: one realized object per case, its clean run cached ---------------------

LAYERS = {
    "mamba": S.mamba(4, d_state=2, d_conv=4),
    "transformer_full": S.transformer(4, 2, window=None),
    "transformer_windowed": S.transformer(4, 2, window=3),
    "bmojo_f": S.bmojo_f(4, 2, window=3, d_state=2),
    "bmojo": S.bmojo(4, 2, window=2, chunk=3, select=2, capacity=3, d_state=2),
    "mosaic_unbounded": S.mosaic(4, 2),
    "persistent": S.persistent(4, 2, slots=3),
}
# Memory Mosaics' block: a bounded contextual memory and the persistent memory as its FFN.
MODELS = {"mosaic_persistent": S.model([S.mosaic(4, 2, capacity=4)], vocab_size=5,
                                       ffn="persistent")}
_CACHE: dict = {}


def _case(name, spec):
    """(realized object, clean input, clean parallel output), built once per case."""
    if name not in _CACHE:
        params = params64(spec, seed=1)
        rng = np.random.default_rng(2)
        if isinstance(spec, S.Model):
            x = rng.integers(0, spec.vocab_size - 1, size=(2, T)).astype(np.int32)
        else:
            x = rng.standard_normal((2, T, spec.d_model))
        obj = realize(spec, params)
        _CACHE[name] = (params, x, _parallel(obj, x)[0])
    return _CACHE[name]


def _fresh(obj):
    return obj.init_state(2, max_len=T, dtype=jnp.float64)


def _parallel(obj, x):
    y, state = obj(jnp.asarray(x), _fresh(obj))
    return np.asarray(y), obj.to_reference_state(state)


def check_forms(obj, x, y, state) -> None:
    """fold(step) and forward(x[:a]) + forward(x[a:], state) against the parallel form."""
    ys, s_fold = scan_steps(obj, jnp.asarray(x), _fresh(obj))
    assert_same_where_finite(ys, y, "y (fold of step)")
    assert_states_match(obj.to_reference_state(s_fold), state, "final state (fold of step)")
    a = T // 2
    y1, s1 = obj(jnp.asarray(x[:, :a]), _fresh(obj))
    y2, s2 = obj(jnp.asarray(x[:, a:]), s1)
    assert_same_where_finite(np.concatenate([y1, y2], axis=1), y, f"y (split at {a})")
    assert_states_match(obj.to_reference_state(s2), state, f"final state (split at {a})")


@pytest.mark.parametrize("name", list(LAYERS))
@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_layer_poison_is_causal(name, t, value, data):
    spec = LAYERS[name]
    params, x, y_clean = _case(name, spec)
    layer = realize(spec, params)
    xb = x.copy()
    xb[0, t, data.draw(st.integers(0, spec.d_model - 1), label="channel")] = value
    y, state = _parallel(layer, xb)
    assert_prefix_clean(y[:1], y_clean[:1], t, axis=1, what="y (parallel)")
    assert_same_where_finite(y[1:], y_clean[1:], "y of the clean batch row")
    check_forms(layer, xb, y, state)


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_model_poison_is_causal(name, t, value, data):
    """The poison is one embedding row, the token V - 1, used only at position t of row 0."""
    spec = MODELS[name]
    params, tokens, y_clean = _case(name, spec)
    V = spec.vocab_size
    poisoned = dict(params, **{"embed.weight": params["embed.weight"].copy()})
    poisoned["embed.weight"][V - 1, data.draw(st.integers(0, spec.d_model - 1))] = value
    tokens = tokens.copy()
    tokens[0, t] = V - 1
    model = realize(spec, poisoned)
    y, state = _parallel(model, tokens)
    # The tied head reads the poisoned row for logit V - 1 at every position.
    assert_prefix_clean(y[:1, :, :V - 1], y_clean[:1, :, :V - 1], t, axis=1, what="logits")
    check_forms(model, tokens, y, state)


# --- the primitives' functions ----------------------------------------------------------------


def _index(data, shape, t: int, time_axis: int) -> tuple:
    idx = [data.draw(st.integers(0, n - 1)) for n in shape]
    idx[time_axis] = t
    return tuple(idx)


# (grouped B and C, z, D, delta_bias, softplus): two fixed configurations, each one compile
SCAN_CONFIGS = [(False, True, True, True, True), (True, False, False, False, False)]


@pytest.mark.parametrize("config", SCAN_CONFIGS, ids=["full", "grouped_bare"])
@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_selective_scan_poison_is_causal(config, t, value, data):
    grouped, has_z, has_d, has_bias, softplus = config
    rng = np.random.default_rng(3)
    Bt, Dc, N = 2, 4, 2
    bc = (Bt, 2, N, T) if grouped else (Bt, N, T)
    arrays = {"u": rng.standard_normal((Bt, Dc, T)), "delta": np.abs(rng.standard_normal(
        (Bt, Dc, T))), "B": rng.standard_normal(bc), "C": rng.standard_normal(bc)}
    if has_z:
        arrays["z"] = rng.standard_normal((Bt, Dc, T))
    A = -np.exp(rng.standard_normal((Dc, N)))
    kw = dict(D=jnp.asarray(rng.standard_normal(Dc)) if has_d else None,
              delta_bias=jnp.asarray(np.abs(rng.standard_normal(Dc))) if has_bias else None,
              delta_softplus=softplus)
    h0 = jnp.asarray(rng.standard_normal((Bt, Dc, N)))
    name = data.draw(st.sampled_from(sorted(arrays)), label="input")
    bad = _poison(arrays, name, _index(data, arrays[name].shape, t, -1), value)

    def run(a, h, lo, hi):
        cut = {k: jnp.asarray(v[..., lo:hi]) for k, v in a.items()}
        return SS.selective_scan(cut["u"], cut["delta"], jnp.asarray(A), cut["B"], cut["C"],
                                 z=cut.get("z"), initial_state=h, return_final_state=True,
                                 implementation="jax", **kw)

    y_clean, _ = run(arrays, h0, 0, T)
    y, hT = run(bad, h0, 0, T)
    assert_prefix_clean(y, y_clean, t, axis=-1, what=f"y (poisoned {name})")
    h, ys = h0, []
    for s in range(T):
        at = {k: jnp.asarray(v[..., s]) for k, v in bad.items()}
        y_s, h = SS.selective_state_update(h, at["u"], at["delta"], jnp.asarray(A), at["B"],
                                           at["C"], z=at.get("z"), **kw)
        ys.append(y_s)
    assert_same_where_finite(jnp.stack(ys, axis=-1), y, "y (fold of selective_state_update)")
    assert_same_where_finite(h, hT, "final state (fold)")
    y1, h1 = run(bad, h0, 0, T // 2)
    y2, h2 = run(bad, h1, T // 2, T)
    assert_same_where_finite(jnp.concatenate([y1, y2], axis=-1), y, "y (split)")
    assert_same_where_finite(h2, hT, "final state (split)")


@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_leaky_average_poison_is_causal(t, value, data):
    rng = np.random.default_rng(4)
    k = rng.standard_normal((2, T, 2, 3))
    log_decay = jnp.asarray(-np.abs(rng.standard_normal(2)))
    kb = _poison({"k": k}, "k", _index(data, k.shape, t, 1), value)["k"]
    y_clean = LA.leaky_average(jnp.asarray(k), log_decay)
    y, hT = LA.leaky_average(jnp.asarray(kb), log_decay, return_final_state=True)
    assert_prefix_clean(y, y_clean, t, axis=1, what="kbar")
    h, ys = jnp.zeros((2, 2, 3)), []
    for s in range(T):
        y_s, h = LA.leaky_average_step(jnp.asarray(kb[:, s]), log_decay, h)
        ys.append(y_s)
    assert_same_where_finite(jnp.stack(ys, axis=1), y, "kbar (fold of leaky_average_step)")
    assert_same_where_finite(h, hT, "final state (fold)")


# (window, fading): a window alone, a window with the fading source. Full attention is the
# transformer_full layer's case (the op's streaming cache grows: a compilation per step).
READOUT_CONFIGS = [(3, False), (2, True)]


@pytest.mark.parametrize("config", READOUT_CONFIGS, ids=["window", "fading"])
@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_windowed_readout_poison_is_causal(config, t, value, data):
    window, fading = config
    rng = np.random.default_rng(5)
    names = ["q", "k", "v"] + (["fading_k", "fading_v"] if fading else [])
    arrays = {n: rng.standard_normal((2, T, 2, 3)) for n in names}
    name = data.draw(st.sampled_from(names), label="input")
    bad = _poison(arrays, name, _index(data, arrays[name].shape, t, 1), value)

    def run(a, lo=0, hi=T, state=None):
        cut = {n: jnp.asarray(v[:, lo:hi]) for n, v in a.items()}
        return WR.windowed_readout(**cut, window=window, initial_state=state,
                                   return_final_state=True, implementation="jax")

    o_clean, _ = run(arrays)
    o, state = run(bad)
    assert_prefix_clean(o, o_clean, t, axis=1, what="o (parallel)")
    s = WR.windowed_readout_state(jnp.asarray(bad["q"]), window, fading=fading)
    outs = []
    for i in range(T):
        step_in = {n + "_t": jnp.asarray(v[:, i]) for n, v in bad.items()}
        o_i, s = WR.windowed_readout_step(state=s, window=window, **step_in)
        outs.append(o_i)
    assert_same_where_finite(jnp.stack(outs, axis=1), o, "o (fold of windowed_readout_step)")
    assert_states_match(s, state, "final state (fold)")
    o1, s1 = run(bad, 0, T // 2)
    o2, s2 = run(bad, T // 2, T, s1)
    assert_same_where_finite(jnp.concatenate([o1, o2], axis=1), o, "o (split)")
    assert_states_match(s2, state, "final state (split)")


@pytest.mark.parametrize("capacity", [None, 3], ids=["unbounded", "capacity"])
@settings(max_examples=EXAMPLES)
@given(t=st.integers(0, T - 1), value=POISONS, data=st.data())
def test_associative_readout_poison_is_causal(capacity, t, value, data):
    rng = np.random.default_rng(6)
    arrays = {n: rng.standard_normal((2, T, 2, 3)) for n in ("k", "v")}
    name = data.draw(st.sampled_from(["k", "v"]), label="input")
    bad = _poison(arrays, name, _index(data, arrays[name].shape, t, 1), value)
    y_clean = AR.associative_readout(*(jnp.asarray(arrays[n]) for n in ("k", "v")), capacity)
    y = AR.associative_readout(*(jnp.asarray(bad[n]) for n in ("k", "v")), capacity)
    assert_prefix_clean(y, y_clean, t, axis=1, what="y")
    ys = _associative_fold(jnp.asarray(bad["k"]), jnp.asarray(bad["v"]), capacity)
    assert_same_where_finite(ys, y, "y (fold of readout_step)")


@functools.partial(jax.jit, static_argnums=(2,))
def _associative_fold(k, v, capacity):
    """The streaming form over k, v [B, T, H, E]: query t reads after the pair t - 1 enters."""
    B, T_, H, E = k.shape
    kt, vt = jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0)  # [T, B, H, E]
    prev_k = jnp.concatenate([jnp.zeros_like(kt[:1]), kt[:-1]])
    prev_v = jnp.concatenate([jnp.zeros_like(vt[:1]), vt[:-1]])
    mem = jnp.zeros((B, H, T_ if capacity is None else capacity, E), k.dtype)

    def body(carry, xs):
        mem_k, mem_v = carry
        s, q, kp, vp = xs
        o, mem_k, mem_v = AR.readout_step(q, kp, vp, mem_k, mem_v, s, capacity)
        return (mem_k, mem_v), o

    _, outs = jax.lax.scan(body, (mem, mem), (jnp.arange(T_), kt, prev_k, prev_v))
    return jnp.moveaxis(outs, 0, 1)


# --- the store's order with non-finite scores ---------------------------------------------------

@st.composite
def entry_sets(draw, offset: int, S_: int = 5):
    """An entry set of S_ slots over one batch row whose scores may hold NaN and infinities
    (one size, so the store's functions compile once)."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    score = rng.standard_normal((1, S_))
    for i in range(S_):
        if draw(st.booleans()):
            score[0, i] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.5]))
    filled = rng.random((1, S_)) >= 0.2
    pos = np.where(filled, offset + rng.permutation(50)[:S_][None], -1)
    fk = filled[:, None, :, None]
    return {"k": np.where(fk, rng.standard_normal((1, 2, S_, 3)), 0.0),
            "v": np.where(fk, rng.standard_normal((1, 2, S_, 3)), 0.0),
            "score": np.where(filled, score, 0.0), "pos": pos.astype(np.int32)}


# compiled: op by op, each example would dispatch hundreds of small computations
_top = jax.jit(ES.store_top, static_argnums=1)
_merge = jax.jit(ES.store_merge, static_argnums=2)


@settings(max_examples=EXAMPLES)
@given(a=entry_sets(0), b=entry_sets(100), c=entry_sets(200), n=st.sampled_from([3, 7]))
def test_store_order_is_total_with_nonfinite_scores(a, b, c, n):
    """A NaN score ranks above every other score (on a tie, the later position first), so
    ``store_top`` picks distinct entries in that order and ``store_merge`` is associative."""
    top = _top(a, n)
    filled = [i for i in range(a["pos"].shape[1]) if a["pos"][0, i] >= 0]

    def key(i):
        s = a["score"][0, i]
        return (not math.isnan(s), 0.0 if math.isnan(s) else -s, -a["pos"][0, i])

    want = sorted(filled, key=key)[:n]
    got_pos = [int(p) for p in np.asarray(top["pos"][0]) if p >= 0]
    assert got_pos == [int(a["pos"][0, i]) for i in want], (
        f"store_top kept positions {got_pos}, expected {[a['pos'][0, i] for i in want]}")
    for slot, i in enumerate(want):
        np.testing.assert_array_equal(np.asarray(top["v"][0, :, slot]), a["v"][0, :, i])
        np.testing.assert_array_equal(np.asarray(top["score"][0, slot]), a["score"][0, i])
    left = _merge(_merge(a, b, n), c, n)
    right = _merge(a, _merge(b, c, n), n)
    assert_states_match({f: np.asarray(x) for f, x in left.items()},
                        {f: np.asarray(x) for f, x in right.items()}, "merge associativity")
