"""DESIGN section 3's reductions: each special case equals the model it claims to be, and the
primitives equal plain loop-by-loop versions written from DESIGN's text (plain.py)."""

from __future__ import annotations

import numpy as np
import plain
import pytest
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import layers as L
from memcore.spec.reference import ops as R
from refcheck import (
    assert_close,
    assert_states_equal,
    bmojo_f_specs,
    inputs,
    mamba_specs,
    model_specs,
    mosaic_specs,
    params64,
    persistent_specs,
    scan_cases,
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


def test_rope_convention_by_hand():
    """One coordinate pair rotated by hand: pairs (i, i + E//2), angle p * 10000^(-2i/(2*(E//2))),
    and an odd last coordinate left alone."""
    from memcore.spec.reference.rope import rope

    v = np.arange(1.0, 6.0)  # E = 5: pairs (0, 2), (1, 3); coordinate 4 stays
    p = 3
    got = rope(np, v[None, None, None, :], np.array([p]))[0, 0, 0]
    t0, t1 = p * 1.0, p * 10000.0 ** -0.5
    want = np.array([
        v[0] * np.cos(t0) - v[2] * np.sin(t0),
        v[1] * np.cos(t1) - v[3] * np.sin(t1),
        v[2] * np.cos(t0) + v[0] * np.sin(t0),
        v[3] * np.cos(t1) + v[1] * np.sin(t1),
        v[4],
    ])
    assert_close(got, want, "rope of one vector")
    assert_close(got, plain.rope_vec(v, p), "rope vs the test's rope")


@given(case=scan_cases())
def test_selective_scan_is_a_plain_loop(case):
    args, opt, h0 = case
    y, hT = R.selective_scan(*args, **opt, initial_state=h0, return_final_state=True)
    want_y, want_h = plain.selective_scan(*args, **opt, h0=h0)
    assert_close(y, want_y, "y (selective_scan vs loop)")
    assert_close(hT, want_h, "final state (selective_scan vs loop)")
    assert_close(R.selective_scan(*args, **opt, initial_state=h0), want_y,
                 "y without return_final_state")


def _mamba_ssm_selective_scan_ref():
    """mamba-ssm's pure-torch ``selective_scan_ref``. Its module imports the CUDA extension at
    the top and the package imports modules with heavy dependencies, neither of which the ref
    needs: load the one module with a placeholder extension, and undo it afterwards."""
    import importlib
    import importlib.util
    import sys
    import types

    try:
        found = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError):
        found = None
    if found is None:
        pytest.skip("mamba_ssm is not installed; the plain loop above stands in for its ref")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in (
        "mamba_ssm", "selective_scan_cuda")}
    try:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(found.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        return mod.selective_scan_ref
    except Exception as err:  # any import failure means the ref cannot run here
        pytest.skip(f"mamba_ssm's selective_scan_ref cannot be imported: {err!r}")
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ("mamba_ssm",
                                                                 "selective_scan_cuda")]:
            del sys.modules[k]
        sys.modules.update(saved)


@given(case=scan_cases())
def test_selective_scan_matches_mamba_ssm_reference(case):
    """mamba-ssm's ref computes in float32 whatever the input, so the bound is DESIGN's float32
    one (relative RMSE <= 1e-5) and not the float64 one."""
    torch = pytest.importorskip("torch", reason="torch is needed for mamba-ssm's reference")
    selective_scan_ref = _mamba_ssm_selective_scan_ref()
    (u, delta, A, Bm, Cm), opt, h0 = case
    if h0 is not None:
        h0 = None  # mamba-ssm has no initial state
    t = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in opt.items()}
    args = [torch.from_numpy(a).float() for a in (u, delta, A, Bm, Cm)]
    t = {k: (v.float() if hasattr(v, "float") else v) for k, v in t.items()}
    want, want_h = selective_scan_ref(*args, **t, return_last_state=True)
    y, h = R.selective_scan(*args, **t, return_final_state=True)
    for got, ref, what in ((y, want, "y"), (h, want_h, "final state")):
        g, r = got.double(), ref.double()
        rmse = float(torch.sqrt(torch.mean((g - r) ** 2)) / torch.sqrt(torch.mean(r ** 2)))
        assert rmse <= 1e-5, f"{what} vs mamba-ssm selective_scan_ref: relative RMSE {rmse:.2e}"


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


@given(spec=mosaic_specs(), T=st.integers(1, 12), seed=seeds)
def test_mosaic_is_plain_associative_memory(spec, T, seed):
    p = params64(spec, seed, jitter=0.05)
    x = inputs(spec, 2, T, seed)
    y, _ = L.forward(spec, p, x)
    assert_close(y, plain.mosaic(spec, p, x), "y (mosaic vs DESIGN 2.5 written plainly)")
    assert np.all(y[:, 0] == 0.0), "the first position has no past pair and must read 0"


@given(spec=persistent_specs(), T=st.integers(1, 12), seed=seeds)
def test_persistent_is_plain_persistent_memory(spec, T, seed):
    p = params64(spec, seed, jitter=0.05)
    x = inputs(spec, 2, T, seed)
    y, _ = L.forward(spec, p, x)
    assert_close(y, plain.persistent(spec, p, x), "y (persistent vs DESIGN 2.6 written plainly)")


@given(spec=mosaic_specs(), T=st.integers(2, 10), seed=seeds)
def test_associative_readout_op_matches_the_mosaic_layer_core(spec, T, seed):
    """ops.associative_readout on keys/values built by hand equals the plain softmax."""
    rng = np.random.default_rng(seed)
    H, E = spec.n_heads, spec.head_dim
    k = rng.standard_normal((1, T, H, E))
    v = rng.standard_normal((1, T, H, E))
    got = R.associative_readout(k, v, capacity=spec.capacity)
    want = np.zeros_like(k)
    for h in range(H):
        for t in range(1, T):
            js = [j for j in range(t) if spec.capacity is None or j >= t - spec.capacity]
            want[0, t, h] = plain.softmax_readout([k[0, t, h] @ k[0, j, h] for j in js],
                                                  v[0, js, h])
    assert_close(got, want, "associative_readout vs plain")


def _rms(h, w):
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-5) * w


def _layer_norm(h, w):
    mu = h.mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w


def _gelu_tanh(a):
    return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))


@given(spec=model_specs(), T=st.integers(1, 8), seed=seeds)
def test_model_is_embedding_pre_norm_blocks_and_tied_head(spec, T, seed):
    """The model written as its docstring says, from the layer reference: embedding, blocks
    h += mixer(norm1(h)); h += ffn(norm2(h)), then logits = logit_scale norm_f(h) embed^T."""
    from memcore.spec.reference import model as M

    p = params64(spec, seed)
    tokens = inputs(spec, 2, T, seed)
    norm = _rms if spec.norm == "rms" else _layer_norm
    h = p["embed.weight"][tokens]
    for i, layer in enumerate(spec.layers):
        pre = f"layers.{i}."
        sub = {k[len(pre + "mixer."):]: v for k, v in p.items() if k.startswith(pre + "mixer.")}
        h = h + L.forward(layer, sub, norm(h, p[pre + "norm1.weight"]))[0]
        if spec.ffn is None:
            continue
        g = norm(h, p[pre + "norm2.weight"])
        if spec.ffn == "mlp":
            h = h + _gelu_tanh(g @ p[pre + "ffn.fc1.weight"].T) @ p[pre + "ffn.fc2.weight"].T
        else:
            fsub = {k[len(pre + "ffn."):]: v for k, v in p.items() if k.startswith(pre + "ffn.")}
            h = h + plain.persistent(spec.ffn, fsub, g)
    want = norm(h, p["norm_f.weight"]) @ p["embed.weight"].T * spec.logit_scale
    logits, _ = M.forward(spec, p, tokens)
    assert_close(logits, want, "logits (model vs its blocks written out)")
