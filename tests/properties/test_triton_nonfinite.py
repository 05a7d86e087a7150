"""DESIGN 6 on the Triton kernels (interpreted on the CPU): causality holds for every value,
finite or not.

The kernels are poisoned as the torch path is in ``test_torch_nonfinite``: a NaN or an infinity
at position t leaves every output before t finite and equal to the clean run's, and the
kernels' parallel outputs equal the streaming form (the torch path's steps, or the kernel
file's plain per-query ``*_ref``) wherever either is finite, non-finite at the same places.
The kernels run with short chunks and blocks, so that short sequences cross tile edges; the
interpreter is slow, so the example counts are small.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton")

from memcore.backends.torch import eidetic_store as t_store  # noqa: E402
from memcore.backends.torch import implementation  # noqa: E402
from memcore.backends.torch import leaky_average as t_leaky  # noqa: E402
from memcore.backends.torch import selective_scan as t_scan  # noqa: E402
from memcore.kernels.triton import associative_readout as k_assoc  # noqa: E402
from memcore.kernels.triton import eidetic_store as k_store  # noqa: E402
from memcore.kernels.triton import leaky_average as k_leaky  # noqa: E402
from memcore.kernels.triton import selective_scan as k_scan  # noqa: E402
from memcore.kernels.triton import windowed_readout as k_window  # noqa: E402
from refcheck import REALIZATIONS, inputs, params64, scan_cases  # noqa: E402

import memcore  # noqa: E402
from tests.properties.test_torch_nonfinite import (  # noqa: E402
    POISONS,
    assert_prefix_clean,
    assert_same_where_finite,
    assert_states_match,
    entry_sets,
    layer_cases,
)

# The interpreter computes with the NaN and infinities the tests put in, as numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

KERNEL_LAYERS = [(name, s) for name, s in REALIZATIONS
                 if name in ("mamba", "transformer_windowed", "bmojo_f_fading_untied", "bmojo",
                             "mosaic_unbounded", "mosaic_capacity", "persistent")]


@contextlib.contextmanager
def kernels(mode: str):
    """``MEMCORE_KERNELS`` set to ``mode`` (a function-scoped monkeypatch does not mix with
    hypothesis)."""
    saved = os.environ.get(implementation.ENV)
    os.environ[implementation.ENV] = mode
    try:
        yield
    finally:
        if saved is None:
            del os.environ[implementation.ENV]
        else:
            os.environ[implementation.ENV] = saved


def _poison(a, index, value):
    a = a.clone()
    a[index] = value
    return a


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def _random(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# --- layers on the kernels --------------------------------------------------------------------

@pytest.mark.parametrize("spec_st", [s for _, s in KERNEL_LAYERS],
                         ids=[n for n, _ in KERNEL_LAYERS])
@settings(max_examples=3)
@given(data=st.data())
def test_layer_poison_is_causal_on_kernels(spec_st, data):
    case = data.draw(layer_cases(spec_st, max_t=10), label="case")
    spec, t = case["spec"], case["t"]
    layer = memcore.realize(spec, backend="torch", params=params64(spec, case["seed"]))
    x = torch.from_numpy(inputs(spec, case["B"], case["T"], case["seed"]))
    xb = x.clone()
    xb[0, t, case["channel"]] = case["value"]
    with kernels("torch"):  # the clean run on the torch path: the kernels agree to rounding
        y_clean, _ = layer(x)
    with kernels("triton"):
        y, state = layer(xb)
        y1, s1 = layer(xb[:, :case["a"]])
        y2, s2 = layer(xb[:, case["a"]:], s1)
    assert_prefix_clean(y[:1], y_clean[:1], t, axis=1, what="y (kernels)")
    assert_same_where_finite(y[1:], y_clean[1:], "y of the clean batch row")
    assert_same_where_finite(torch.cat([y1, y2], 1), y, f"y (split at {case['a']})")
    assert_states_match(s2, state, f"final state (split at {case['a']})")
    s, ys = None, []
    for i in range(case["T"]):  # the streaming form: the torch path's steps
        y_i, s = layer.step(xb[:, i], s)
        ys.append(y_i)
    assert_same_where_finite(torch.stack(ys, 1), y, "y (fold of step)")
    assert_states_match(s, state, "final state (fold of step)")


# --- the scans --------------------------------------------------------------------------------

@settings(max_examples=8)
@given(case=scan_cases(), data=st.data(), chunk=st.sampled_from([1, 2, 4]))
def test_selective_scan_kernel_poison_is_causal(case, data, chunk):
    (u, delta, A, Bm, Cm), opt, h0 = case
    u, delta, A, Bm, Cm, h0 = map(_t, (u, delta, A, Bm, Cm, h0))
    opt = {k: _t(v) if isinstance(v, np.ndarray) else v for k, v in opt.items()}
    T = u.shape[2]
    arrays = dict(u=u, delta=delta, B=Bm, C=Cm, z=opt["z"])
    name = data.draw(st.sampled_from([n for n, a in arrays.items() if a is not None]),
                     label="input")
    t = data.draw(st.integers(0, T - 1), label="t")
    lead = tuple(data.draw(st.integers(0, n - 1)) for n in arrays[name].shape[:-1])
    bad = dict(arrays, **{name: _poison(arrays[name], lead + (t,),
                                        data.draw(POISONS, label="value"))})
    kw = dict(D=opt["D"], delta_bias=opt["delta_bias"], delta_softplus=opt["delta_softplus"])

    def run(a):
        return k_scan.selective_scan(a["u"], a["delta"], A, a["B"], a["C"], z=a["z"],
                                     initial_state=h0, return_final_state=True, chunk=chunk,
                                     **kw)

    y_clean, _ = run(arrays)
    y, hT = run(bad)
    assert_prefix_clean(y, y_clean, t, axis=-1, what=f"y (poisoned {name})")
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64) if h0 is None \
        else h0
    ys = []
    for s in range(T):
        at = {k: None if v is None else v[..., s] for k, v in bad.items()}
        y_s, h = t_scan.selective_state_update(h, at["u"], at["delta"], A, at["B"], at["C"],
                                               z=at["z"], **kw)
        ys.append(y_s)
    assert_same_where_finite(torch.stack(ys, -1), y, "y (fold of selective_state_update)")
    assert_same_where_finite(h, hT, "final state (fold)")


@settings(max_examples=8)
@given(data=st.data(), chunk=st.sampled_from([1, 2, 4]))
def test_leaky_average_kernel_poison_is_causal(data, chunk):
    B, T, H, E = (data.draw(st.integers(1, n)) for n in (2, 12, 2, 3))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    k, log_decay = _random(g, B, T, H, E), -_random(g, H).abs()
    t = data.draw(st.integers(0, T - 1), label="t")
    idx = (data.draw(st.integers(0, B - 1)), t, data.draw(st.integers(0, H - 1)),
           data.draw(st.integers(0, E - 1)))
    kb = _poison(k, idx, data.draw(POISONS, label="value"))
    y_clean = k_leaky.leaky_average(k, log_decay, chunk=chunk)
    y, hT = k_leaky.leaky_average(kb, log_decay, return_final_state=True, chunk=chunk)
    assert_prefix_clean(y, y_clean, t, axis=1, what="kbar")
    h, ys = torch.zeros(B, H, E, dtype=torch.float64), []
    for s in range(T):
        y_s, h = t_leaky.leaky_average_step(kb[:, s], log_decay, h)
        ys.append(y_s)
    assert_same_where_finite(torch.stack(ys, 1), y, "kbar (fold of leaky_average_step)")
    assert_same_where_finite(h, hT, "final state (fold)")


# --- the softmax readouts ---------------------------------------------------------------------

@st.composite
def windowed_cases(draw):
    """Queries at positions pos .., keys from a cache before them, a fading window and store
    snapshots whose entries sit before their chunk; one input poisoned at one entry."""
    B, H, E = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Tq = draw(st.integers(1, 12), label="Tq")
    cache = draw(st.integers(0, 4), label="cache")
    pos = cache + draw(st.integers(0, 3), label="pos")
    W = draw(st.integers(1, 5), label="window")
    fading, store = draw(st.booleans(), label="fading"), draw(st.booleans(), label="store")
    chunk, M = draw(st.integers(1, 4), label="chunk"), draw(st.integers(1, 3), label="slots")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16), label="seed"))
    Tk = cache + Tq
    arrays = {"q": _random(g, B, Tq, H, E), "k": _random(g, B, Tk, H, E),
              "v": _random(g, B, Tk, H, E)}
    if fading:
        arrays.update(fading_k=_random(g, B, Tk, H, E), fading_v=_random(g, B, Tk, H, E))
    extra = {}
    if store:
        S = (pos + Tq - 1) // chunk - pos // chunk + 1
        arrays.update(store_k=_random(g, B, H, S, M, E), store_v=_random(g, B, H, S, M, E))
        first = (pos // chunk + torch.arange(S)) * chunk  # each snapshot's chunk start
        spos = (torch.rand(B, S, M, generator=g) * first[None, :, None]).long() - 1
        extra = {"store_pos": spos, "chunk": chunk}
    name = draw(st.sampled_from(sorted(arrays)), label="input")
    index = tuple(draw(st.integers(0, n - 1)) for n in arrays[name].shape)
    bad = dict(arrays, **{name: _poison(arrays[name], index, draw(POISONS, label="value"))})
    return arrays, bad, dict(window=W, pos=pos, **extra), name, index


@settings(max_examples=10)
@given(case=windowed_cases())
def test_windowed_readout_kernel_poison_is_causal(case):
    arrays, bad, kw, name, index = case
    o = k_window.windowed_readout(**bad, **kw)
    # the plain per-query form: each query's visible keys, selected by index or mask
    assert_same_where_finite(o, k_window.windowed_readout_ref(**bad, **kw),
                             f"o against the per-query form (poisoned {name} at {index})")
    if name in ("k", "v", "fading_k", "fading_v", "q"):
        cache = arrays["k"].shape[1] - arrays["q"].shape[1]
        t = index[1] - (0 if name == "q" else cache)  # the poisoned position's query row
        assert_prefix_clean(o, k_window.windowed_readout(**arrays, **kw), max(t, 0), axis=1,
                            what=f"o (poisoned {name})")


@settings(max_examples=10)
@given(data=st.data())
def test_associative_readout_kernel_poison_is_causal(data):
    B, T, H, E = (data.draw(st.integers(1, n)) for n in (2, 12, 2, 3))
    capacity = data.draw(st.one_of(st.none(), st.integers(1, 6)), label="capacity")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    arrays = {n: _random(g, B, T, H, E) for n in ("k", "v")}
    name = data.draw(st.sampled_from(["k", "v"]), label="input")
    t = data.draw(st.integers(0, T - 1), label="t")
    idx = (data.draw(st.integers(0, B - 1)), t, data.draw(st.integers(0, H - 1)),
           data.draw(st.integers(0, E - 1)))
    bad = dict(arrays, **{name: _poison(arrays[name], idx, data.draw(POISONS, label="value"))})
    y = k_assoc.associative_readout(bad["k"], bad["v"], capacity)
    assert_prefix_clean(y, k_assoc.associative_readout(arrays["k"], arrays["v"], capacity), t,
                        axis=1, what="y")
    for s in range(T):  # each row read from the prefix that ends at it, on the torch path
        y_s = k_assoc.associative_readout_ref(bad["k"][:, :s + 1], bad["v"][:, :s + 1],
                                              capacity)[:, s]
        assert_same_where_finite(y[:, s], y_s, f"y at {s} (from the prefix)")


# --- the store's selection --------------------------------------------------------------------

def _same_entries(got, want, what):
    for f in ("k", "v", "score", "pos"):
        g, w = got[f].detach(), want[f].detach()
        assert g.shape == w.shape and torch.equal(g.isnan(), w.isnan()), (what, f, g, w)
        assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(w)), (what, f, g, w)


@settings(max_examples=15)
@given(data=st.data())
def test_store_kernels_order_nonfinite_scores_as_torch(data):
    """A NaN score ranks above every number on both paths; the kernels' ranks stay a
    permutation, so they pick what the torch path picks."""
    H, E = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    a, b = (data.draw(entry_sets(2, H, E, offset=o)) for o in (0, 100))
    for e in (a, b):  # a NaN score on one filled slot per row (empty slots keep score 0)
        for row in range(2):
            filled = torch.nonzero(e["pos"][row] >= 0).flatten().tolist()
            if filled:
                e["score"][row, data.draw(st.sampled_from(filled))] = math.nan
    n = data.draw(st.integers(0, 8), label="n")
    _same_entries(k_store.store_top(a, n), t_store.store_top(a, n, implementation="torch"),
                  "store_top")
    _same_entries(k_store.store_merge(a, b, n),
                  t_store.store_merge(a, b, n, implementation="torch"), "store_merge")


@settings(max_examples=10)
@given(data=st.data())
def test_innovation_select_kernel_with_nonfinite_scores(data):
    B, H, E = data.draw(st.integers(1, 2)), 1, data.draw(st.integers(1, 2))
    T, chunk = data.draw(st.integers(1, 12), label="T"), data.draw(st.integers(1, 4))
    select = data.draw(st.integers(0, chunk), label="select")
    M, pos = data.draw(st.integers(0, 3), label="capacity"), data.draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    score = _random(g, B, T)
    for i in data.draw(st.lists(st.integers(0, T - 1), max_size=4), label="poisoned"):
        score[0, i] = data.draw(POISONS)
    tokens = {"k": _random(g, B, H, T, E), "v": _random(g, B, H, T, E), "score": score}
    store = t_store.empty(B, H, M, E, torch.float64, "cpu")
    cand = t_store.empty(B, H, select, E, torch.float64, "cpu")
    got = k_store.innovation_select(tokens, pos, chunk, select, store, cand)
    want = k_store.innovation_select_ref(tokens, pos, chunk, select, store, cand,
                                         t_store.merge)
    for what, gs, ws in zip(("snapshots", "store", "candidates"), got, want, strict=True):
        _same_entries(gs, ws, what)


def test_nan_score_outranks_infinity_in_kernel():
    """The kernel's order by hand: NaN, +inf, then the numbers, -inf last; ties by position."""
    score = torch.tensor([[1.0, math.nan, -math.inf, math.inf, math.nan, 1.0]],
                         dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5]])
    idx, _ = k_store.top_indices(score, pos, score[:, :0], pos[:, :0], 6)
    assert idx.tolist() == [[4, 1, 3, 5, 0, 2]]
