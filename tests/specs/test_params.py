"""memcore.init: determinism, names and shapes, the superset property between realizations."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.params import param_shapes
from refcheck import REALIZATIONS, bmojo_f_specs

import memcore
from memcore import spec as S

any_spec = st.one_of([s for _, s in REALIZATIONS])
seeds = st.integers(0, 2 ** 31)


@given(spec=any_spec, seed=seeds)
def test_init_is_deterministic(spec, seed):
    a, b = memcore.init(spec, seed), memcore.init(spec, seed)
    assert list(a) == list(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@given(spec=any_spec, seed=seeds)
def test_seeds_give_different_random_parameters(spec, seed):
    a, b = memcore.init(spec, seed), memcore.init(spec, seed + 1)
    random = [k for k in a if a[k].size > 1 and np.unique(a[k]).size > 1
              and not k.endswith(("A_log", "leak"))]  # A_log and leak are deterministic
    for k in random:
        assert not np.array_equal(a[k], b[k]), f"{k} does not depend on the seed"


@given(spec=any_spec)
def test_init_names_and_shapes_are_param_shapes(spec):
    p = memcore.init(spec, 0)
    shapes = param_shapes(spec)
    assert list(p) == list(shapes)
    assert {k: v.shape for k, v in p.items()} == shapes
    assert memcore.param_shapes(spec) == shapes
    memcore.check_params(spec, p)  # a spec accepts its own init
    for v in p.values():
        assert v.dtype == np.float32 and v.flags["C_CONTIGUOUS"]
        assert np.all(np.isfinite(v))


@given(spec=any_spec, dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_init_dtype(spec, dtype):
    p64, p = memcore.init(spec, 3, dtype=np.float64), memcore.init(spec, 3, dtype=dtype)
    for k in p:
        assert p[k].dtype == dtype
        assert np.array_equal(p[k], p64[k].astype(dtype)), k


@given(base=bmojo_f_specs(), chunk=st.integers(1, 4), seed=seeds, data=st.data())
def test_bmojo_params_are_a_superset_of_bmojo_f(base, chunk, seed, data):
    select = data.draw(st.integers(0, chunk))
    capacity = data.draw(st.integers(0, 3))
    kw = {f: getattr(base, f) for f in ("d_model", "n_heads", "window", "d_state", "positions",
                                         "tie_fading", "fading", "d_conv", "expand", "dt_rank")}
    bm = S.bmojo(chunk=chunk, select=select, capacity=capacity, **kw)
    p_bm, p_f = memcore.init(bm, seed), memcore.init(base, seed)
    assert set(p_f) <= set(p_bm)
    assert set(p_bm) - set(p_f) == ({"pred_proj.weight"} if base.fading else set())
    for k in p_f:
        assert np.array_equal(p_bm[k], p_f[k]), k


@given(H=st.integers(1, 3), E=st.integers(1, 4), window=st.integers(1, 6), seed=seeds)
def test_transformer_params_are_bmojo_f_without_fading(H, E, window, seed):
    t = memcore.init(S.transformer(H * E, H, window=window), seed)
    b = memcore.init(S.bmojo_f(H * E, H, window, fading=False), seed)
    assert list(t) == list(b)
    for k in t:
        assert np.array_equal(t[k], b[k]), k


def test_parameter_names_of_each_realization():
    mamba_names = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                   "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"]
    attn = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    assert list(param_shapes(S.transformer(4, 2))) == attn
    assert list(param_shapes(S.mamba(4))) == mamba_names
    assert list(param_shapes(S.bmojo_f(4, 2, 2, tie_fading=False))) == (
        attn + ["fading." + n for n in mamba_names]
        + ["k_fading_proj.weight", "v_fading_proj.weight"])
    assert set(param_shapes(S.mosaic(4, 2))) == {
        "k_proj.weight", "v_proj.weight", "o_proj.weight", "leak", "k_scale", "v_scale",
        "v_mix"}
    m = param_shapes(S.model([S.mamba(4), S.transformer(4, 2)], 9, ffn="mlp", mlp_ratio=3))
    assert m["embed.weight"] == (9, 4)
    assert m["layers.1.mixer.q_proj.weight"] == (4, 4)
    assert m["layers.0.ffn.fc1.weight"] == (12, 4) and m["layers.0.ffn.fc2.weight"] == (4, 12)
    assert m["norm_f.weight"] == (4,)
    none = param_shapes(S.model([S.mamba(4)], 9, ffn=None))
    assert not any(".ffn." in k or "norm2" in k for k in none)


def test_mamba_shapes_and_initial_values_follow_mamba_ssm():
    spec = S.mamba(20, d_state=3, d_conv=4, expand=2)  # dt_rank auto = ceil(20 / 16) = 2
    shapes = param_shapes(spec)
    assert shapes["in_proj.weight"] == (80, 20)
    assert shapes["conv1d.weight"] == (40, 1, 4)
    assert shapes["x_proj.weight"] == (2 + 6, 40)
    assert shapes["dt_proj.weight"] == (40, 2)
    p = memcore.init(spec, 0, dtype=np.float64)
    assert np.allclose(p["A_log"], np.log(np.arange(1, 4))[None, :].repeat(40, 0))
    assert np.all(p["D"] == 1.0)
    dt = np.log1p(np.exp(p["dt_proj.bias"]))  # softplus(bias) is the initial step
    assert np.all(dt >= 1e-3 * (1 - 1e-9)) and np.all(dt <= 0.1 * (1 + 1e-9))
    bound = 1 / math.sqrt(20)
    assert np.all(np.abs(p["in_proj.weight"]) <= bound)


def test_mosaic_initial_values_follow_memory_mosaics():
    p = memcore.init(S.mosaic(8, 4), 0, dtype=np.float64)
    assert np.allclose(np.exp(-10 * np.abs(p["leak"])), np.exp(-np.linspace(0.5, 5, 4)))
    assert np.allclose(p["k_scale"], 0.1) and np.allclose(p["v_scale"], -0.05)
    assert np.all((p["v_mix"] >= 0) & (p["v_mix"] <= 1))


