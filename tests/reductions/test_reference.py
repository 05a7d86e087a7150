"""DESIGN section 3's reductions: each special case equals the model it claims to be, and the
layers equal plain loop-by-loop versions written from DESIGN's text (plain.py)."""

from __future__ import annotations

import numpy as np
import plain
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import layers as L
from refcheck import (
    assert_close,
    assert_states_equal,
    bmojo_f_specs,
    inputs,
    mamba_specs,
    mosaic_specs,
    params64,
    persistent_specs,
    transformer_specs,
)

from memcore import spec as S

seeds = st.integers(0, 2 ** 16)


@given(base=bmojo_f_specs(), chunk=st.integers(1, 5), data=st.data())
def test_bmojo_with_capacity_zero_is_bmojo_f(base, chunk, data):
    select = data.draw(st.integers(0, chunk), label="select")
    T = data.draw(st.integers(1, 16), label="T")
    seed = data.draw(seeds, label="seed")
    kw = {f: getattr(base, f) for f in ("d_model", "n_heads", "window", "d_state", "positions",
                                         "tie_fading", "fading", "d_conv", "expand", "dt_rank")}
    bm = S.bmojo(chunk=chunk, select=select, capacity=0, **kw)
    p_bm = params64(bm, seed)
    # bmojo's parameters are a superset of bmojo_f's: drop the extra ones.
    p_f = {k: v for k, v in p_bm.items() if k in memcore_param_names(base)}
    assert set(p_bm) - set(p_f) <= {"pred_proj.weight"}
    x = inputs(base, 2, T, seed)
    y_bm, s_bm = L.forward(bm, p_bm, x)
    y_f, s_f = L.forward(base, p_f, x)
    assert_close(y_bm, y_f, "y (bmojo capacity 0 vs bmojo_f)")
    shared = set(s_f) - {"spec_id"}
    assert_states_equal({k: s_bm[k] for k in shared}, {k: s_f[k] for k in shared},
                        "shared state")


def memcore_param_names(spec):
    from memcore.spec.params import param_shapes

    return set(param_shapes(spec))


@given(base=transformer_specs(window=None), window=st.integers(1, 8), T=st.integers(1, 16),
       seed=seeds)
def test_bmojo_f_without_fading_is_windowed_transformer(base, window, T, seed):
    tr = S.transformer(base.d_model, base.n_heads, window=window, positions=base.positions)
    bf = S.bmojo_f(base.d_model, base.n_heads, window, positions=base.positions, fading=False)
    p = params64(tr, seed)
    assert set(p) == memcore_param_names(bf)
    x = inputs(tr, 2, T, seed)
    y_t, s_t = L.forward(tr, p, x)
    y_b, s_b = L.forward(bf, p, x)
    assert_close(y_b, y_t, "y (bmojo_f fading=False vs transformer(window))")
    assert_states_equal({k: s_b[k] for k in ("k", "v", "pos")},
                        {k: s_t[k] for k in ("k", "v", "pos")}, "state")
    assert set(s_b) == set(s_t)


@given(spec=transformer_specs(), T=st.integers(1, 12), seed=seeds)
def test_transformer_is_plain_causal_attention_with_rope(spec, T, seed):
    """window None: full causal softmax attention; an int window: sliding-window attention."""
    p = params64(spec, seed)
    x = inputs(spec, 2, T, seed)
    y, _ = L.forward(spec, p, x)
    want = plain.attention(x, p, spec.n_heads, window=spec.window,
                           rope=spec.positions == "rope")
    assert_close(y, want, "y (transformer vs plain attention)")







@given(spec=mamba_specs(), T=st.integers(1, 10), seed=seeds, warm=st.booleans())
def test_mamba_is_a_plain_mamba_block(spec, T, seed, warm):
    """The mamba realization against mamba-ssm's block written as a loop over time, from an
    empty state or from a random one (conv window and ssm state)."""
    p = params64(spec, seed)
    x = inputs(spec, 2, T, seed)
    state = None
    conv0 = h0 = None
    if warm:
        rng = np.random.default_rng(seed + 1)
        state = L.init_state(spec, 2, x)
        conv0 = rng.standard_normal(state["conv"].shape)
        h0 = rng.standard_normal(state["ssm"].shape)
        state = dict(state, conv=conv0, ssm=h0)
    y, _ = L.forward(spec, p, x, state)
    assert_close(y, plain.mamba_block(spec, p, x, conv0, h0), "y (mamba vs plain block)")


def forward_lightly_perturbed(spec, T, seed):
    """The layer on a random [2, T, D] input with parameters perturbed by 0.05 only:
    (y, params, x)."""
    p = params64(spec, seed, jitter=0.05)
    x = inputs(spec, 2, T, seed)
    return L.forward(spec, p, x)[0], p, x


@given(spec=mosaic_specs(), T=st.integers(1, 12), seed=seeds)
def test_mosaic_is_plain_associative_memory(spec, T, seed):
    y, p, x = forward_lightly_perturbed(spec, T, seed)
    assert_close(y, plain.mosaic(spec, p, x), "y (mosaic vs DESIGN 2.5 written plainly)")
    assert np.all(y[:, 0] == 0.0), "the first position has no past pair and must read 0"


@given(spec=persistent_specs(), T=st.integers(1, 12), seed=seeds)
def test_persistent_is_plain_persistent_memory(spec, T, seed):
    y, p, x = forward_lightly_perturbed(spec, T, seed)
    assert_close(y, plain.persistent(spec, p, x), "y (persistent vs DESIGN 2.6 written plainly)")










