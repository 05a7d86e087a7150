"""DESIGN 6: causality holds for every value, finite or not, in the reference.

A NaN or an infinity put into the input at position t (for the ops: into one of the op's own
inputs) must leave every output before t finite and equal to the clean run's (float64,
<= 1e-12 relative), and the streaming fold and the split forward must equal the parallel form
wherever either is finite, with both non-finite at the same places (outputs and final states).
Run on numpy arrays, and on torch and JAX arrays for one realization each.
"""

from __future__ import annotations

import functools
import importlib
import math

import nonfinite
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nonfinite import POISONS, assert_prefix_clean
from nonfinite import poison as _poison
from refcheck import (
    MAX_T,
    REALIZATIONS,
    RTOL,
    fold,
    forward,
    inputs,
    jamba_specs,
    model_specs,
    params64,
    scan_cases,
    to_numpy,
)

from memcore import ops
from memcore import spec as S

# numpy warns of every NaN it makes; here they are the point.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

EXAMPLES = 20  # per layer family
OP_EXAMPLES = 30  # the ops are cheaper: more cases
assert_same_where_finite = functools.partial(nonfinite.assert_same_where_finite, rtol=RTOL)
assert_states_match = functools.partial(nonfinite.assert_states_match, rtol=RTOL)

# --- comparisons ------------------------------------------------------------------------------


def assert_forms_match(spec, params, x, y, state, a: int, exclude=None) -> None:
    """fold(step) and forward(x[:a]) + forward(x[a:], state) against the parallel form."""
    ys, s_fold = fold(spec, params, x)
    y_fold = np.stack([to_numpy(v) for v in ys], axis=1)
    assert_same_where_finite(y_fold, y, "y (fold of step)")
    assert_states_match(s_fold, state, "final state (fold of step)")
    y1, s1 = forward(spec, params, x[:, :a])
    y2, s2 = forward(spec, params, x[:, a:], s1)
    y_split = np.concatenate([to_numpy(y1), to_numpy(y2)], axis=1)
    assert_same_where_finite(y_split, y, f"y (split at {a})")
    assert_states_match(s2, state, f"final state (split at {a})")


# --- layers -----------------------------------------------------------------------------------

LAYERS = [(name, s) for name, s in REALIZATIONS if name not in ("model", "jamba")]


@st.composite
def layer_cases(draw, spec_st, max_t: int = MAX_T, batch=(1, 2)):
    spec = draw(spec_st, label="spec")
    T = draw(st.integers(2, max_t), label="T")
    return dict(spec=spec, T=T, t=draw(st.integers(0, T - 1), label="t"),
                a=draw(st.integers(1, T - 1), label="split"),
                value=draw(POISONS, label="value"),
                channel=draw(st.integers(0, spec.d_model - 1), label="channel"),
                B=draw(st.sampled_from(batch), label="B"),
                seed=draw(st.integers(0, 2 ** 16), label="seed"))


def check_layer(case, convert=lambda a: a) -> None:
    spec, t = case["spec"], case["t"]
    params = params64(spec, case["seed"])
    x = inputs(spec, case["B"], case["T"], case["seed"])
    xb = x.copy()
    xb[0, t, case["channel"]] = case["value"]  # batch row 1, when drawn, stays clean
    y_clean, _ = forward(spec, params, convert(x))
    y, state = forward(spec, params, convert(xb))
    assert_prefix_clean(y[:1], y_clean[:1], t, axis=1, what="y (parallel)")
    assert_same_where_finite(y[1:], y_clean[1:], "y of the clean batch row")
    assert_forms_match(spec, params, convert(xb), y, state, case["a"])


@pytest.mark.parametrize("spec_st", [s for _, s in LAYERS], ids=[n for n, _ in LAYERS])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_layer_poison_is_causal(spec_st, data):
    check_layer(data.draw(layer_cases(spec_st), label="case"))


# --- models: the poison is one embedding row, used only at position t --------------------------

@pytest.mark.parametrize("spec_st", [model_specs(), jamba_specs()], ids=["model", "jamba"])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_model_poison_is_causal(spec_st, data):
    spec = data.draw(spec_st, label="spec")
    T = data.draw(st.integers(2, 16), label="T")
    t = data.draw(st.integers(0, T - 1), label="t")
    a = data.draw(st.integers(1, T - 1), label="split")
    value = data.draw(POISONS, label="value")
    channel = data.draw(st.integers(0, spec.d_model - 1), label="channel")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    params = params64(spec, seed)
    V = spec.vocab_size
    tokens = inputs(spec, 1, T, seed) % (V - 1)  # token V - 1 appears only at t
    tokens[0, t] = V - 1
    poisoned = dict(params)
    poisoned["embed.weight"] = params["embed.weight"].copy()
    poisoned["embed.weight"][V - 1, channel] = value
    y_clean, _ = forward(spec, params, tokens)
    y, state = forward(spec, poisoned, tokens)
    # The tied head reads the poisoned row for logit V - 1 at every position.
    assert_prefix_clean(y[..., :V - 1], y_clean[..., :V - 1], t, axis=1, what="logits")
    assert_forms_match(spec, poisoned, tokens, y, state, a)


# --- the same reference on torch and JAX arrays ------------------------------------------------

def _library(name):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        pytest.skip(f"{name} is not importable: {err}")


@settings(max_examples=8)
@given(data=st.data())
def test_layer_poison_is_causal_on_torch(data):
    torch = _library("torch")
    check_layer(data.draw(layer_cases(dict(REALIZATIONS)["bmojo"], max_t=12), label="case"),
                convert=lambda a: torch.from_numpy(np.ascontiguousarray(a)))


# JAX compiles each op for each new shape, so one fixed spec, length and split (halves of one
# shape): only the poisoned position, its value and channel are drawn. A bounded mosaic runs
# the leaky recurrence, the masked readout and the ring gather.
JAX_SPEC = S.mosaic(4, 2, capacity=2)
JAX_T = 4


@settings(max_examples=6)
@given(t=st.integers(0, JAX_T - 1), value=POISONS, channel=st.integers(0, 3))
def test_layer_poison_is_causal_on_jax(t, value, channel):
    jnp = _library("jax.numpy")
    import jax

    if not jax.config.jax_enable_x64:
        pytest.skip("JAX runs without x64; float64 comparisons need jax_enable_x64")
    check_layer(dict(spec=JAX_SPEC, T=JAX_T, t=t, a=JAX_T // 2, value=value, channel=channel,
                     B=1, seed=5), convert=jnp.asarray)


# --- memcore.ops on numpy arrays --------------------------------------------------------------


@settings(max_examples=OP_EXAMPLES)
@given(case=scan_cases(), data=st.data())
def test_selective_scan_poison_is_causal(case, data):
    (u, delta, A, Bm, Cm), opt, h0 = case
    Bt, Dc, T = u.shape
    names = ["u", "delta", "B", "C"] + (["z"] if opt["z"] is not None else [])
    name = data.draw(st.sampled_from(names), label="input")
    t = data.draw(st.integers(0, T - 1), label="t")
    value = data.draw(POISONS, label="value")
    arrays = dict(u=u, delta=delta, B=Bm, C=Cm, z=opt["z"])
    lead = tuple(data.draw(st.integers(0, n - 1)) for n in arrays[name].shape[:-1])
    bad = _poison(arrays, name, lead + (t,), value)
    kw = dict(D=opt["D"], delta_bias=opt["delta_bias"], delta_softplus=opt["delta_softplus"])

    def run(a, h=None, lo=0, hi=T):
        sl = (Ellipsis, slice(lo, hi))
        return ops.selective_scan(a["u"][sl], a["delta"][sl], A, a["B"][sl], a["C"][sl],
                                  z=None if a["z"] is None else a["z"][sl], initial_state=h,
                                  return_final_state=True, **kw)

    y_clean, _ = run(arrays, h0)
    y, hT = run(bad, h0)
    assert_prefix_clean(y, y_clean, t, axis=-1, what=f"y (poisoned {name})")
    h = np.zeros((Bt, Dc, A.shape[1])) if h0 is None else h0
    ys = []
    for s in range(T):
        at = {k: None if v is None else v[..., s] for k, v in bad.items()}
        y_s, h = ops.selective_state_update(h, at["u"], at["delta"], A, at["B"], at["C"],
                                            z=at["z"], **kw)
        ys.append(y_s)
    assert_same_where_finite(np.stack(ys, axis=-1), y, "y (fold of selective_state_update)")
    assert_same_where_finite(h, hT, "final state (fold)")
    if T > 1:
        a = data.draw(st.integers(1, T - 1), label="split")
        y1, h1 = run(bad, h0, 0, a)
        y2, h2 = run(bad, h1, a, T)
        assert_same_where_finite(np.concatenate([y1, y2], axis=-1), y, f"y (split at {a})")
        assert_same_where_finite(h2, hT, f"final state (split at {a})")


@settings(max_examples=OP_EXAMPLES)
@given(data=st.data())
def test_leaky_average_poison_is_causal(data):
    B, T, H, E = (data.draw(st.integers(1, n)) for n in (2, MAX_T, 3, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    k = rng.standard_normal((B, T, H, E))
    log_decay = -np.abs(rng.standard_normal(H))
    t = data.draw(st.integers(0, T - 1), label="t")
    idx = (data.draw(st.integers(0, B - 1)), t, data.draw(st.integers(0, H - 1)),
           data.draw(st.integers(0, E - 1)))
    kb = _poison({"k": k}, "k", idx, data.draw(POISONS, label="value"))["k"]
    y_clean = ops.leaky_average(k, log_decay)
    y, hT = ops.leaky_average(kb, log_decay, return_final_state=True)
    assert_prefix_clean(y, y_clean, t, axis=1, what="kbar")
    h, ys = np.zeros((B, H, E)), []
    for s in range(T):
        y_s, h = ops.leaky_average_step(kb[:, s], log_decay, h)
        ys.append(y_s)
    assert_same_where_finite(np.stack(ys, axis=1), y, "kbar (fold of leaky_average_step)")
    assert_same_where_finite(h, hT, "final state (fold)")


@st.composite
def readout_case(draw):
    B, T, H, E = (draw(st.integers(1, n)) for n in (2, MAX_T, 2, 3))
    window = draw(st.one_of(st.none(), st.integers(1, 6)), label="window")
    fading = window is not None and draw(st.booleans(), label="fading")
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16), label="seed"))
    names = ["q", "k", "v"] + (["fading_k", "fading_v"] if fading else [])
    arrays = {n: rng.standard_normal((B, T, H, E)) for n in names}
    name = draw(st.sampled_from(names), label="input")
    t = draw(st.integers(0, T - 1), label="t")
    idx = (draw(st.integers(0, B - 1)), t, draw(st.integers(0, H - 1)),
           draw(st.integers(0, E - 1)))
    bad = _poison(arrays, name, idx, draw(POISONS, label="value"))
    return arrays, bad, window, t, draw(st.integers(1, max(T - 1, 1)), label="split")


@settings(max_examples=OP_EXAMPLES)
@given(case=readout_case())
def test_windowed_readout_poison_is_causal(case):
    arrays, bad, window, t, a = case
    T = arrays["q"].shape[1]
    o_clean = ops.windowed_readout(**arrays, window=window)
    o, state = ops.windowed_readout(**bad, window=window, return_final_state=True)
    assert_prefix_clean(o, o_clean, t, axis=1, what="o (parallel)")
    s = ops.windowed_readout_state(bad["q"], window, fading="fading_k" in bad)
    os_ = []
    for i in range(T):
        step_in = {n + "_t": v[:, i] for n, v in bad.items()}
        o_i, s = ops.windowed_readout_step(state=s, window=window, **step_in)
        os_.append(o_i)
    assert_same_where_finite(np.stack(os_, axis=1), o, "o (fold of windowed_readout_step)")
    assert_states_match(s, state, "final state (fold)")
    if T > 1:
        o1, s1 = ops.windowed_readout(**{n: v[:, :a] for n, v in bad.items()}, window=window,
                                      return_final_state=True)
        o2, s2 = ops.windowed_readout(**{n: v[:, a:] for n, v in bad.items()}, window=window,
                                      initial_state=s1, return_final_state=True)
        assert_same_where_finite(np.concatenate([o1, o2], axis=1), o, f"o (split at {a})")
        assert_states_match(s2, state, f"final state (split at {a})")


@settings(max_examples=OP_EXAMPLES)
@given(data=st.data())
def test_associative_readout_poison_is_causal(data):
    B, T, H, E = (data.draw(st.integers(1, n)) for n in (2, 16, 2, 3))
    capacity = data.draw(st.one_of(st.none(), st.integers(1, 6)), label="capacity")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    arrays = {n: rng.standard_normal((B, T, H, E)) for n in ("k", "v")}
    name = data.draw(st.sampled_from(["k", "v"]), label="input")
    t = data.draw(st.integers(0, T - 1), label="t")
    idx = (data.draw(st.integers(0, B - 1)), t, data.draw(st.integers(0, H - 1)),
           data.draw(st.integers(0, E - 1)))
    bad = _poison(arrays, name, idx, data.draw(POISONS, label="value"))
    y_clean = ops.associative_readout(**arrays, capacity=capacity)
    y = ops.associative_readout(**bad, capacity=capacity)
    assert_prefix_clean(y, y_clean, t, axis=1, what="y")
    # Each row read from the prefix that ends at it: the op's own streaming-like form.
    for s in range(T):
        y_s = ops.associative_readout(**{n: v[:, :s + 1] for n, v in bad.items()},
                                      capacity=capacity)[:, s]
        assert_same_where_finite(y_s, y[:, s], f"y at {s} (from the prefix)")


@settings(max_examples=OP_EXAMPLES)
@given(data=st.data())
def test_rowwise_ops_keep_poison_in_its_row(data):
    """persistent_readout and innovation_scores read each position alone."""
    B, T, H, E, P = (data.draw(st.integers(1, n)) for n in (2, 12, 2, 3, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    t = data.draw(st.integers(0, T - 1), label="t")
    value = data.draw(POISONS, label="value")
    k = rng.standard_normal((B, T, H, E))
    mk, mv = rng.standard_normal((H, P, E)), rng.standard_normal((H, P, E))
    kb = _poison({"k": k}, "k", (0, t, 0, 0), value)["k"]
    keep = np.arange(T) != t
    y, y_clean = ops.persistent_readout(kb, mk, mv), ops.persistent_readout(k, mk, mv)
    assert_same_where_finite(y[:, keep], y_clean[:, keep], "persistent_readout off the row")
    D = H * E
    x, s_prev = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    w = rng.standard_normal((D, D))
    name = data.draw(st.sampled_from(["x", "s_prev"]), label="input")
    bad = _poison({"x": x, "s_prev": s_prev}, name, (0, t, 0), value)
    r, r_clean = ops.innovation_scores(bad["x"], bad["s_prev"], w), ops.innovation_scores(
        x, s_prev, w)
    assert_same_where_finite(r[:, keep], r_clean[:, keep], "innovation_scores off the row")


@st.composite
def entry_sets(draw, B, H, E, max_s=6):
    """An entry set whose scores may hold NaN and infinities; distinct positions."""
    S_ = draw(st.integers(0, max_s))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    score = rng.standard_normal((B, S_))
    for b in range(B):
        for i in range(S_):
            if draw(st.booleans()):
                score[b, i] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.5]))
    pos = np.stack([rng.permutation(64)[:S_] for _ in range(B)]).reshape(B, S_)
    filled = rng.random((B, S_)) >= 0.2  # some empty slots, zero as a store keeps them
    fk = filled[:, None, :, None]
    return {"k": np.where(fk, rng.standard_normal((B, H, S_, E)), 0.0),
            "v": np.where(fk, rng.standard_normal((B, H, S_, E)), 0.0),
            "score": np.where(filled, score, 0.0), "pos": np.where(filled, pos, -1)}


def _filled_key(e, b, i):
    return (int(e["pos"][b, i]), e["score"][b, i].tobytes(), e["k"][b, :, i].tobytes(),
            e["v"][b, :, i].tobytes())


@settings(max_examples=OP_EXAMPLES)
@given(data=st.data())
def test_store_order_is_total_with_nonfinite_scores(data):
    """A NaN score counts as +inf (ties: later position first), so selection stays a strict
    total order: store_top picks distinct entries verbatim and store_merge is associative,
    whatever the scores hold."""
    B, H, E = 1, data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    a, b, c = (data.draw(entry_sets(B, H, E)) for _ in range(3))
    # Positions distinct across the three sets, as they are in a stream.
    b = dict(b, pos=np.where(b["pos"] >= 0, b["pos"] + 100, -1))
    c = dict(c, pos=np.where(c["pos"] >= 0, c["pos"] + 200, -1))
    n = data.draw(st.integers(0, 8), label="n")
    top = ops.store_top(a, n)
    want = [i for i in range(a["pos"].shape[1]) if a["pos"][0, i] >= 0]
    score = np.where(np.isnan(a["score"][0]), math.inf, a["score"][0])
    want.sort(key=lambda i: (-score[i], -a["pos"][0, i]))
    want = want[:n]
    got = [i for i in range(n) if top["pos"][0, i] >= 0]
    assert len(got) == len(want), f"top kept {len(got)} filled entries, expected {len(want)}"
    for slot, i in zip(got, want, strict=True):
        assert _filled_key(top, 0, slot) == _filled_key(a, 0, i), (
            f"slot {slot} holds position {top['pos'][0, slot]}, expected {a['pos'][0, i]}")
    left = ops.store_merge(ops.store_merge(a, b, n), c, n)
    right = ops.store_merge(a, ops.store_merge(b, c, n), n)
    assert_states_match(left, right, "merge(merge(a, b), c) vs merge(a, merge(b, c))")
