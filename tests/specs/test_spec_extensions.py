"""The spec fields that map transformers' models (``memcore.interop.from_hf``): grouped-query
attention, the SwiGLU FFN and its width, the norm epsilon, an untied head, Jamba's inner
RMSNorms. Validation by name, JSON round trips, parameter shapes and sizes; specs that use none
of them keep their JSON and spec_id."""

from __future__ import annotations

import numpy as np
import pytest
from memcore.spec.params import check_params, param_shapes
from memcore.spec.sizes import param_bytes, state_bytes

import memcore
from memcore import spec as S


def _full():
    return S.Model((S.Transformer(8, 4, window=3, n_kv_heads=2, rope_theta=5e5),
                    S.Mamba(8, d_state=3, inner_norm_eps=1e-6)), 11, "swiglu", d_ff=12,
                   norm_eps=1e-6, tie_embeddings=False)


@pytest.mark.parametrize("make, match", [
    (lambda: S.Transformer(8, 4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
    (lambda: S.Transformer(8, 4, n_kv_heads=0), "n_kv_heads must be >= 1"),
    (lambda: S.Transformer(8, 4, n_kv_heads=2.0), "n_kv_heads must be an int"),
    (lambda: S.Transformer(8, 4, rope_theta=0.0), "rope_theta must be > 0"),
    (lambda: S.Transformer(8, 4, rope_theta=float("inf")), "rope_theta must be finite"),
    (lambda: S.Mamba(8, inner_norm_eps=0.0), "inner_norm_eps must be > 0"),
    (lambda: S.Mamba(8, inner_norm_eps="1e-6"), "inner_norm_eps must be a float"),
    (lambda: S.Model((S.Mamba(8),), 5, "swish"), "ffn must be 'mlp', 'swiglu'"),
    (lambda: S.Model((S.Mamba(8),), 5, "swiglu", d_ff=0), "d_ff must be >= 1"),
    (lambda: S.Model((S.Mamba(8),), 5, None, d_ff=4), "d_ff=4 is the hidden width"),
    (lambda: S.Model((S.Mamba(8),), 5, norm_eps=-1e-5), "norm_eps must be > 0"),
    (lambda: S.Model((S.Mamba(8),), 5, norm_eps=float("nan")), "norm_eps must be finite"),
    (lambda: S.Model((S.Mamba(8),), 5, tie_embeddings=0), "tie_embeddings must be a bool"),
])
def test_bad_values_are_refused_by_name(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_json_round_trip_holds_the_new_fields():
    spec = _full()
    data = spec.to_dict()
    assert data["d_ff"] == 12 and data["norm_eps"] == 1e-6 and data["tie_embeddings"] is False
    assert data["layers"][0]["n_kv_heads"] == 2 and data["layers"][1]["inner_norm_eps"] == 1e-6
    assert data["layers"][0]["rope_theta"] == 5e5
    assert S.from_json(spec.to_json()) == spec


def test_specs_without_the_new_fields_keep_their_json():
    """Defaults leave the JSON (so spec_id and stored checkpoints' specs) as before."""
    old = ('{"ffn":"mlp","kind":"model","layers":[{"d_model":8,"kind":"transformer",'
           '"n_heads":4,"positions":"rope","window":null},{"d_conv":4,"d_model":8,'
           '"d_state":16,"dt_rank":"auto","expand":2,"kind":"mamba"}],"logit_scale":1.0,'
           '"mlp_ratio":4,"norm":"rms","vocab_size":5}')
    spec = S.Model((S.Transformer(8, 4), S.Mamba(8)), 5)
    assert spec.to_json() == old
    assert S.from_json(old) == spec
    assert S.Transformer(8, 4, n_kv_heads=4) == S.Transformer(8, 4)  # the default, spelled out


def test_param_shapes():
    shapes = param_shapes(_full())
    assert shapes["layers.0.mixer.q_proj.weight"] == (8, 8)
    assert shapes["layers.0.mixer.k_proj.weight"] == (4, 8)  # 2 kv heads of width 2
    assert shapes["layers.0.mixer.v_proj.weight"] == (4, 8)
    assert shapes["layers.0.mixer.o_proj.weight"] == (8, 8)
    R = S.Mamba(8).dt_rank_value
    assert shapes["layers.1.mixer.dt_layernorm.weight"] == (R,)
    assert shapes["layers.1.mixer.b_layernorm.weight"] == (3,)
    assert shapes["layers.1.mixer.c_layernorm.weight"] == (3,)
    for i in range(2):
        assert shapes[f"layers.{i}.ffn.gate_proj.weight"] == (12, 8)
        assert shapes[f"layers.{i}.ffn.up_proj.weight"] == (12, 8)
        assert shapes[f"layers.{i}.ffn.down_proj.weight"] == (8, 12)
    assert shapes["lm_head.weight"] == (11, 8)
    assert not any(".fc1." in n for n in shapes)
    tied = param_shapes(S.Model((S.Mamba(8),), 11, "mlp", d_ff=5))
    assert "lm_head.weight" not in tied and tied["layers.0.ffn.fc1.weight"] == (5, 8)
    assert "layers.0.mixer.dt_layernorm.weight" not in tied


def test_init_and_sizes_agree():
    spec = _full()
    params = memcore.init(spec, seed=0)
    check_params(spec, params)
    assert param_bytes(spec) == sum(a.nbytes for a in params.values())
    state = memcore.realize(spec, backend="reference", params=params).init_state(2)
    assert state["layers"][0]["k"].shape == (2, 2, 3, 2)  # [B, n_kv_heads, W, E]
    held = sum(a.size for layer in state["layers"] for k, a in layer.items()
               if isinstance(a, np.ndarray)) * 4
    assert state_bytes(spec, batch=2) == held


def test_grouped_query_attention_is_attention_with_repeated_heads():
    """n_kv_heads=2 of 4 heads equals full multi-head attention whose key/value heads repeat
    each kv head for its group, in both forms."""
    gqa = S.Model((S.Transformer(8, 4, window=3, n_kv_heads=2),), 7, None)
    mha = S.Model((S.Transformer(8, 4, window=3),), 7, None)
    p = memcore.init(gqa, seed=1, dtype=np.float64)
    q = dict(p)
    for n in ("k", "v"):  # rows [kv head, E] -> repeat each kv head twice
        w = p[f"layers.0.mixer.{n}_proj.weight"].reshape(2, 1, 2, 8)
        q[f"layers.0.mixer.{n}_proj.weight"] = np.repeat(w, 2, axis=1).reshape(8, 8)
    tok = np.random.default_rng(0).integers(0, 7, (2, 9))
    a, _ = memcore.realize(gqa, backend="reference", params=p)(tok)
    b, _ = memcore.realize(mha, backend="reference", params=q)(tok)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-12
