"""``memcore.interop.from_hf`` on transformers' MambaForCausalLM: the mapped spec and params
give transformers' logits in every backend, in the parallel and the streaming form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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

pytest.importorskip("jax")


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["f64", "f32"])
def mapped(request):
    model = build("mamba", request.param)
    tok = tokens()
    spec, params = from_hf(model)
    return request.param, spec, params, tok, hf_logits(model, tok)


def test_spec():
    model = build("mamba")
    spec, params = from_hf(model)
    assert spec.ffn is None and spec.norm == "rms" and spec.tie_embeddings
    assert spec.norm_eps == model.config.layer_norm_epsilon
    assert spec.layers == (S.Mamba(16, d_state=4, d_conv=4, expand=2, dt_rank=3),) * 2
    assert all(a.dtype == np.float64 for a in params.values())
    sd = model.state_dict()
    w = params["layers.1.mixer.x_proj.weight"]
    assert np.array_equal(w, sd["backbone.layers.1.mixer.x_proj.weight"].numpy())
    w[...] = 0  # a copy: the source is untouched
    assert sd["backbone.layers.1.mixer.x_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(mapped, backend, form):
    dtype, spec, params, tok, want = mapped
    got = memcore_logits(spec, params, tok, backend, form)
    assert max_error(got, want) <= TOL[dtype]


def test_untied_head():
    model = build("mamba", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    spec, params = from_hf(model)
    assert not spec.tie_embeddings
    assert np.array_equal(params["lm_head.weight"], model.lm_head.weight.detach().numpy())
    tok = tokens()
    got = memcore_logits(spec, params, tok, "torch", "parallel")
    assert max_error(got, hf_logits(model, tok)) <= TOL[torch.float64]


def test_no_conv_bias_is_a_zero_bias():
    model = build("mamba", use_conv_bias=False)
    spec, params = from_hf(model)
    assert not params["layers.0.mixer.conv1d.bias"].any()
    tok = tokens()
    got = memcore_logits(spec, params, tok, "reference", "parallel")
    assert max_error(got, hf_logits(model, tok)) <= TOL[torch.float64]


def test_float64_casts_only_round():
    """Stock transformers in float64 differs from its float64-kept run by float32 rounding."""
    model = build("mamba")
    tok = tokens()
    assert max_error(hf_logits(model, tok, stock=True), hf_logits(model, tok)) <= 1e-5
