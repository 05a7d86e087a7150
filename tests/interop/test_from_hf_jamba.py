"""``memcore.interop.from_hf`` on transformers' JambaForCausalLM with dense FFNs: Mamba layers
with Jamba's inner RMSNorms on dt, B and C, attention without positions and with grouped-query
heads, SwiGLU FFNs in every block; transformers' logits in every backend and form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="from_hf maps transformers models (memcore[hf])")
pytest.importorskip("jax", reason="the mapped models run in the JAX backend too (memcore[jax])")

from memcore import spec as S
from memcore.interop import from_hf
from tests.interop.hf_cases import (
    BACKENDS,
    FORMS,
    TOL,
    build,
    hf_logits,
    max_error,
    memcore_logits,
    tokens,
)


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["f64", "f32"])
def mapped(request):
    model = build("jamba", request.param)
    tok = tokens()
    spec, params = from_hf(model)
    return request.param, spec, params, tok, hf_logits(model, tok)


def test_spec():
    model = build("jamba")
    spec, params = from_hf(model)
    mamba = S.Mamba(16, d_state=4, d_conv=4, expand=2, dt_rank=3, inner_norm_eps=1e-6)
    attention = S.Transformer(16, 4, window=None, positions="none", n_kv_heads=2)
    assert spec.layers == (mamba, attention, mamba, attention)
    assert (spec.ffn, spec.d_ff, spec.norm_eps, spec.tie_embeddings) == ("swiglu", 24, 1e-6,
                                                                         False)
    mixer = model.model.layers[2].mamba
    for name in ("dt_layernorm", "b_layernorm", "c_layernorm"):
        want = getattr(mixer, name).weight.detach().numpy()
        assert np.array_equal(params[f"layers.2.mixer.{name}.weight"], want)
    assert params["layers.1.mixer.v_proj.weight"].shape == (8, 16)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(mapped, backend, form):
    dtype, spec, params, tok, want = mapped
    got = memcore_logits(spec, params, tok, backend, form)
    assert max_error(got, want) <= TOL[dtype]


def test_inner_norms_matter():
    """Without the dt/B/C norms (a plain Mamba block) the logits differ: the test above would
    see a mapping that dropped them."""
    model = build("jamba")
    spec, params = from_hf(model)
    plain = S.Model(tuple(S.Mamba(16, 4, 4, 2, 3) if isinstance(s, S.Mamba) else s
                          for s in spec.layers), spec.vocab_size, "swiglu", d_ff=24,
                    norm_eps=1e-6, tie_embeddings=False)
    kept = {k: v for k, v in params.items() if "_layernorm" not in k}
    tok = tokens()
    got = memcore_logits(plain, kept, tok, "reference", "parallel")
    assert max_error(got, hf_logits(model, tok)) > 1e-4


def test_no_conv_bias_and_other_periods():
    model = build("jamba", mamba_conv_bias=False, attn_layer_period=3, attn_layer_offset=0,
                  num_hidden_layers=3, mamba_dt_rank=1)
    spec, params = from_hf(model)
    assert [s.kind for s in spec.layers] == ["transformer", "mamba", "mamba"]
    assert spec.layers[1].dt_rank == "auto"  # 1 = ceil(16 / 16), mamba-ssm's rule
    assert not params["layers.1.mixer.conv1d.bias"].any()
    tok = tokens()
    got = memcore_logits(spec, params, tok, "torch", "streaming")
    assert max_error(got, hf_logits(model, tok)) <= TOL[torch.float64]


def test_float64_casts_only_round():
    model = build("jamba")
    tok = tokens()
    assert max_error(hf_logits(model, tok, stock=True), hf_logits(model, tok)) <= 1e-5
