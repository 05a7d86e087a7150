"""DESIGN 6 on the torch backend: causality holds for every value, finite or not.

A NaN or an infinity put into the input at position t (for the ops: into one of the op's own
inputs) must leave every parallel output before t finite and equal to the clean run's (float64,
<= 1e-12 relative); the streaming fold and the split forward must equal the parallel form
wherever either is finite, with both non-finite at the same places (outputs and final states).
The torch path's own tiling (scan chunks and groups, attention query blocks) is drawn small, so
that short sequences cross every block boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import nonfinite
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memcore.backends.torch import associative_readout as t_assoc
from memcore.backends.torch import banded
from memcore.backends.torch import eidetic_store as t_store
from memcore.backends.torch import leaky_average as t_leaky
from memcore.backends.torch import selective_scan as t_scan
from memcore.backends.torch import windowed_readout as t_window
from nonfinite import POISONS, assert_prefix_clean, to_numpy
from nonfinite import poison as _poison
from refcheck import MAX_T, REALIZATIONS, inputs, jamba_specs, model_specs, params64, scan_cases

import memcore
from memcore.testing import TOLERANCE

FORMS_RTOL = TOLERANCE["float64"]  # streaming and split forms against the parallel form
assert_same_where_finite = functools.partial(nonfinite.assert_same_where_finite, rtol=FORMS_RTOL)
assert_states_match = functools.partial(nonfinite.assert_states_match, rtol=FORMS_RTOL)
EXAMPLES = 20
LAYERS = [(name, s) for name, s in REALIZATIONS if name not in ("model", "jamba")]


@contextlib.contextmanager
def tiling(chunk: int, group: int, block: int):
    """The torch path's scan chunk, scan group and attention query block, set small."""
    saved = t_scan.CHUNK, t_scan.GROUP_ELEMENTS, banded.MIN_BLOCK
    t_scan.CHUNK, t_scan.GROUP_ELEMENTS, banded.MIN_BLOCK = chunk, group, block
    try:
        yield
    finally:
        t_scan.CHUNK, t_scan.GROUP_ELEMENTS, banded.MIN_BLOCK = saved


TILINGS = st.tuples(st.integers(1, 8), st.sampled_from([1, 50, 1 << 24]), st.integers(1, 8))

# --- comparisons ------------------------------------------------------------------------------


def assert_forms_match(obj, x, y, state, a: int) -> None:
    """fold(step) and obj(x[:, :a]) then obj(x[:, a:], state) against the parallel form."""
    s, ys = None, []
    for i in range(x.shape[1]):
        y_i, s = obj.step(x[:, i], s)
        ys.append(y_i)
    assert_same_where_finite(torch.stack(ys, 1), y, "y (fold of step)")
    assert_states_match(s, state, "final state (fold of step)")
    y1, s1 = obj(x[:, :a])
    y2, s2 = obj(x[:, a:], s1)
    assert_same_where_finite(torch.cat([y1, y2], 1), y, f"y (split at {a})")
    assert_states_match(s2, state, f"final state (split at {a})")


# --- layers -----------------------------------------------------------------------------------

@st.composite
def layer_cases(draw, spec_st, max_t: int = MAX_T):
    spec = draw(spec_st, label="spec")
    T = draw(st.integers(2, max_t), label="T")
    return dict(spec=spec, T=T, t=draw(st.integers(0, T - 1), label="t"),
                a=draw(st.integers(1, T - 1), label="split"),
                value=draw(POISONS, label="value"),
                channel=draw(st.integers(0, spec.d_model - 1), label="channel"),
                B=draw(st.sampled_from([1, 2]), label="B"),
                seed=draw(st.integers(0, 2 ** 16), label="seed"))


def check_layer(case) -> None:
    """The poison goes into batch row 0 at position t; a second batch row stays clean."""
    spec, t = case["spec"], case["t"]
    layer = memcore.realize(spec, backend="torch", params=params64(spec, case["seed"]))
    x = torch.from_numpy(inputs(spec, case["B"], case["T"], case["seed"]))
    xb = x.clone()
    xb[0, t, case["channel"]] = case["value"]
    y_clean, _ = layer(x)
    y, state = layer(xb)
    assert_prefix_clean(y[:1], y_clean[:1], t, axis=1, what="y (parallel)")
    assert_same_where_finite(y[1:], y_clean[1:], "y of the clean batch row")
    assert_forms_match(layer, xb, y, state, case["a"])


@pytest.mark.parametrize("spec_st", [s for _, s in LAYERS], ids=[n for n, _ in LAYERS])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_layer_poison_is_causal(spec_st, data):
    case = data.draw(layer_cases(spec_st), label="case")
    with tiling(*data.draw(TILINGS, label="tiling")):
        check_layer(case)


# --- models: the poison is one embedding row, used only at position t --------------------------

@pytest.mark.parametrize("spec_st", [model_specs(), jamba_specs()], ids=["model", "jamba"])
@settings(max_examples=10)
@given(data=st.data())
def test_model_poison_is_causal(spec_st, data):
    T = data.draw(st.integers(2, 16), label="T")
    # Every token distinct: a repeated pair of tokens gives a store's innovation test two
    # scores equal up to rounding, whose order the two forms may break differently.
    spec = dataclasses.replace(data.draw(spec_st, label="spec"), vocab_size=T + 1)
    t = data.draw(st.integers(0, T - 1), label="t")
    a = data.draw(st.integers(1, T - 1), label="split")
    value = data.draw(POISONS, label="value")
    channel = data.draw(st.integers(0, spec.d_model - 1), label="channel")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    params = params64(spec, seed)
    V = spec.vocab_size
    rest = np.random.default_rng(seed).permutation(V - 1)  # token V - 1 appears only at t
    tokens = torch.from_numpy(np.insert(rest[:T - 1], t, V - 1)[None, :])
    poisoned = dict(params)
    poisoned["embed.weight"] = params["embed.weight"].copy()
    poisoned["embed.weight"][V - 1, channel] = value
    clean = memcore.realize(spec, backend="torch", params=params)
    model = memcore.realize(spec, backend="torch", params=poisoned)
    with tiling(*data.draw(TILINGS, label="tiling")):
        y_clean, _ = clean(tokens)
        y, state = model(tokens)
        # The tied head reads the poisoned row for logit V - 1 at every position.
        assert_prefix_clean(y[..., :V - 1], y_clean[..., :V - 1], t, axis=1, what="logits")
        assert_forms_match(model, tokens, y, state, a)


# --- the ops ----------------------------------------------------------------------------------


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


@settings(max_examples=EXAMPLES)
@given(case=scan_cases(), data=st.data())
def test_selective_scan_poison_is_causal(case, data):
    (u, delta, A, Bm, Cm), opt, h0 = case
    u, delta, A, Bm, Cm, h0 = map(_t, (u, delta, A, Bm, Cm, h0))
    opt = {k: _t(v) if isinstance(v, np.ndarray) else v for k, v in opt.items()}
    Bt, Dc, T = u.shape
    names = ["u", "delta", "B", "C"] + (["z"] if opt["z"] is not None else [])
    name = data.draw(st.sampled_from(names), label="input")
    t = data.draw(st.integers(0, T - 1), label="t")
    arrays = dict(u=u, delta=delta, B=Bm, C=Cm, z=opt["z"])
    lead = tuple(data.draw(st.integers(0, n - 1)) for n in arrays[name].shape[:-1])
    bad = _poison(arrays, name, lead + (t,), data.draw(POISONS, label="value"))
    kw = dict(D=opt["D"], delta_bias=opt["delta_bias"], delta_softplus=opt["delta_softplus"])

    def run(a, h=None, lo=0, hi=T):
        sl = (Ellipsis, slice(lo, hi))
        return t_scan.selective_scan(a["u"][sl], a["delta"][sl], A, a["B"][sl], a["C"][sl],
                                     z=None if a["z"] is None else a["z"][sl], initial_state=h,
                                     return_final_state=True, implementation="torch", **kw)

    y_clean, _ = run(arrays, h0)
    y, hT = run(bad, h0)
    assert_prefix_clean(y, y_clean, t, axis=-1, what=f"y (poisoned {name})")
    h = torch.zeros(Bt, Dc, A.shape[1], dtype=torch.float64) if h0 is None else h0
    ys = []
    for s in range(T):
        at = {k: None if v is None else v[..., s] for k, v in bad.items()}
        y_s, h = t_scan.selective_state_update(h, at["u"], at["delta"], A, at["B"], at["C"],
                                               z=at["z"], **kw)
        ys.append(y_s)
    assert_same_where_finite(torch.stack(ys, -1), y, "y (fold of selective_state_update)")
    assert_same_where_finite(h, hT, "final state (fold)")
    if T > 1:
        a = data.draw(st.integers(1, T - 1), label="split")
        y1, h1 = run(bad, h0, 0, a)
        y2, h2 = run(bad, h1, a, T)
        assert_same_where_finite(torch.cat([y1, y2], -1), y, f"y (split at {a})")
        assert_same_where_finite(h2, hT, f"final state (split at {a})")


def _random(rng, *shape):
    return torch.from_numpy(rng.standard_normal(shape))


@settings(max_examples=EXAMPLES)
@given(data=st.data(), chunk=st.integers(1, 8))
def test_leaky_average_poison_is_causal(data, chunk):
    B, T, H, E = (data.draw(st.integers(1, n)) for n in (2, MAX_T, 3, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    k, log_decay = _random(rng, B, T, H, E), -_random(rng, H).abs()
    t = data.draw(st.integers(0, T - 1), label="t")
    idx = (data.draw(st.integers(0, B - 1)), t, data.draw(st.integers(0, H - 1)),
           data.draw(st.integers(0, E - 1)))
    kb = _poison({"k": k}, "k", idx, data.draw(POISONS, label="value"))["k"]
    with tiling(chunk, 1 << 24, banded.MIN_BLOCK):
        y_clean = t_leaky.leaky_average(k, log_decay, implementation="torch")
        y, hT = t_leaky.leaky_average(kb, log_decay, return_final_state=True,
                                      implementation="torch")
    assert_prefix_clean(y, y_clean, t, axis=1, what="kbar")
    h, ys = torch.zeros(B, H, E, dtype=torch.float64), []
    for s in range(T):
        y_s, h = t_leaky.leaky_average_step(kb[:, s], log_decay, h)
        ys.append(y_s)
    assert_same_where_finite(torch.stack(ys, 1), y, "kbar (fold of leaky_average_step)")
    assert_same_where_finite(h, hT, "final state (fold)")


@st.composite
def readout_cases(draw):
    B, T, H, E = (draw(st.integers(1, n)) for n in (2, MAX_T, 2, 3))
    window = draw(st.one_of(st.none(), st.integers(1, 6)), label="window")
    fading = window is not None and draw(st.booleans(), label="fading")
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16), label="seed"))
    names = ["q", "k", "v"] + (["fading_k", "fading_v"] if fading else [])
    arrays = {n: _random(rng, B, T, H, E) for n in names}
    name = draw(st.sampled_from(names), label="input")
    t = draw(st.integers(0, T - 1), label="t")
    idx = (draw(st.integers(0, B - 1)), t, draw(st.integers(0, H - 1)),
           draw(st.integers(0, E - 1)))
    bad = _poison(arrays, name, idx, draw(POISONS, label="value"))
    return arrays, bad, window, t, draw(st.integers(1, max(T - 1, 1)), label="split")


@settings(max_examples=EXAMPLES)
@given(case=readout_cases(), block=st.integers(1, 8))
def test_windowed_readout_poison_is_causal(case, block):
    arrays, bad, window, t, a = case
    T = arrays["q"].shape[1]
    kw = dict(window=window, implementation="torch")
    with tiling(t_scan.CHUNK, t_scan.GROUP_ELEMENTS, block):
        o_clean = t_window.windowed_readout(**arrays, **kw)
        o, state = t_window.windowed_readout(**bad, return_final_state=True, **kw)
        assert_prefix_clean(o, o_clean, t, axis=1, what="o (parallel)")
        s = t_window.windowed_readout_state(bad["q"], window, fading="fading_k" in bad)
        os_ = []
        for i in range(T):
            o_i, s = t_window.windowed_readout_step(state=s, window=window,
                                                    **{n + "_t": v[:, i] for n, v in bad.items()})
            os_.append(o_i)
        assert_same_where_finite(torch.stack(os_, 1), o, "o (fold of windowed_readout_step)")
        assert_states_match(s, state, "final state (fold)")
        if T > 1:
            o1, s1 = t_window.windowed_readout(**{n: v[:, :a] for n, v in bad.items()},
                                               return_final_state=True, **kw)
            o2, s2 = t_window.windowed_readout(**{n: v[:, a:] for n, v in bad.items()},
                                               initial_state=s1, return_final_state=True, **kw)
            assert_same_where_finite(torch.cat([o1, o2], 1), o, f"o (split at {a})")
            assert_states_match(s2, state, f"final state (split at {a})")


@settings(max_examples=EXAMPLES)
@given(data=st.data(), block=st.integers(1, 8))
def test_associative_readout_poison_is_causal(data, block):
    B, T, H, E = (data.draw(st.integers(1, n)) for n in (2, 16, 2, 3))
    capacity = data.draw(st.one_of(st.none(), st.integers(1, 6)), label="capacity")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    arrays = {n: _random(rng, B, T, H, E) for n in ("k", "v")}
    name = data.draw(st.sampled_from(["k", "v"]), label="input")
    t = data.draw(st.integers(0, T - 1), label="t")
    idx = (data.draw(st.integers(0, B - 1)), t, data.draw(st.integers(0, H - 1)),
           data.draw(st.integers(0, E - 1)))
    bad = _poison(arrays, name, idx, data.draw(POISONS, label="value"))
    kw = dict(capacity=capacity, implementation="torch")
    with tiling(t_scan.CHUNK, t_scan.GROUP_ELEMENTS, block):
        y_clean = t_assoc.associative_readout(**arrays, **kw)
        y = t_assoc.associative_readout(**bad, **kw)
        assert_prefix_clean(y, y_clean, t, axis=1, what="y")
        # Each row read from the prefix that ends at it: the op's streaming-like form.
        for s in range(T):
            y_s = t_assoc.associative_readout(**{n: v[:, :s + 1] for n, v in bad.items()},
                                              **kw)[:, s]
            assert_same_where_finite(y_s, y[:, s], f"y at {s} (from the prefix)")


@st.composite
def entry_sets(draw, B, H, E, max_s=6, offset=0):
    """An entry set whose scores may hold NaN and infinities; distinct positions; zeros in
    empty slots, as a store keeps them."""
    S_ = draw(st.integers(0, max_s))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    score = rng.standard_normal((B, S_))
    for b in range(B):
        for i in range(S_):
            if draw(st.booleans()):
                score[b, i] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.5]))
    pos = np.stack([rng.permutation(64)[:S_] for _ in range(B)]).reshape(B, S_) + offset
    filled = rng.random((B, S_)) >= 0.2
    fk = filled[:, None, :, None]
    return {"k": _t(np.where(fk, rng.standard_normal((B, H, S_, E)), 0.0)),
            "v": _t(np.where(fk, rng.standard_normal((B, H, S_, E)), 0.0)),
            "score": _t(np.where(filled, score, 0.0)), "pos": _t(np.where(filled, pos, -1))}


def _entry(e, b, i):
    return (int(e["pos"][b, i]), to_numpy(e["score"][b, i]).tobytes(),
            to_numpy(e["k"][b, :, i]).tobytes(), to_numpy(e["v"][b, :, i]).tobytes())


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_store_order_is_total_with_nonfinite_scores(data):
    """A NaN score ranks above every other score (on ties, the later position first), so the
    selection is a strict total order: store_top keeps distinct entries verbatim and
    store_merge is associative, whatever the scores hold."""
    H, E = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    a, b, c = (data.draw(entry_sets(1, H, E, offset=o)) for o in (0, 100, 200))
    n = data.draw(st.integers(0, 8), label="n")
    top = t_store.store_top(a, n, implementation="torch")
    sc, ps = to_numpy(a["score"])[0], to_numpy(a["pos"])[0]
    want = sorted((i for i in range(len(ps)) if ps[i] >= 0),
                  key=lambda i: (not math.isnan(sc[i]), 0.0 if math.isnan(sc[i]) else -sc[i],
                                 -ps[i]))[:n]
    got = [i for i in range(n) if top["pos"][0, i] >= 0]
    assert len(got) == len(want), f"top kept {len(got)} filled entries, expected {len(want)}"
    for slot, i in zip(got, want, strict=True):
        assert _entry(top, 0, slot) == _entry(a, 0, i), (
            f"slot {slot} holds position {int(top['pos'][0, slot])}, expected {ps[i]}")
    merge = t_store.store_merge
    left = merge(merge(a, b, n, implementation="torch"), c, n, implementation="torch")
    right = merge(a, merge(b, c, n, implementation="torch"), n, implementation="torch")
    assert_states_match(left, right, "merge(merge(a, b), c) vs merge(a, merge(b, c))")
