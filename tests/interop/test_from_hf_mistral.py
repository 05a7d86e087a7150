"""``memcore.interop.from_hf`` on transformers' MistralForCausalLM, full and sliding-window
attention with grouped-query heads: transformers' logits in every backend and form, and the
window's width exactly (a query sees ``sliding_window`` tokens, itself included)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="from_hf maps transformers models (memcore[hf])")
pytest.importorskip("jax", reason="the mapped models run in the JAX backend too (memcore[jax])")

import memcore
from memcore import spec as S
from memcore.interop import from_hf
from tests.interop.hf_cases import (
    BACKENDS,
    FORMS,
    TOKENS,
    TOL,
    WINDOW,
    build,
    hf_logits,
    max_error,
    memcore_logits,
    tokens,
)

WINDOWS = {"full": None, "sliding": WINDOW}


@pytest.fixture(scope="module", params=[(w, d) for w in WINDOWS for d in ("f64", "f32")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def mapped(request):
    window, name = request.param
    dtype = {"f64": torch.float64, "f32": torch.float32}[name]
    model = build("mistral", dtype, sliding_window=WINDOWS[window])
    tok = tokens()
    spec, params = from_hf(model)
    return dtype, spec, params, tok, hf_logits(model, tok)


@pytest.mark.parametrize("window", list(WINDOWS))
def test_spec(window):
    model = build("mistral", sliding_window=WINDOWS[window])
    spec, params = from_hf(model)
    layer = S.Transformer(16, 4, window=WINDOWS[window], positions="rope", n_kv_heads=2)
    assert spec.layers == (layer, layer)
    assert (spec.ffn, spec.d_ff, spec.norm_eps) == ("swiglu", 24, 1e-6)
    assert not spec.tie_embeddings  # Mistral's head is its own (tie_word_embeddings=False)
    assert params["layers.0.mixer.k_proj.weight"].shape == (2 * 4, 16)
    assert np.array_equal(params["layers.1.ffn.gate_proj.weight"],
                          model.model.layers[1].mlp.gate_proj.weight.detach().numpy())
    assert np.array_equal(params["lm_head.weight"], model.lm_head.weight.detach().numpy())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(mapped, backend, form):
    dtype, spec, params, tok, want = mapped
    assert tok.shape[1] > 2 * WINDOW
    got = memcore_logits(spec, params, tok, backend, form)
    assert max_error(got, want) <= TOL[dtype]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_theta(backend, form):
    """Mistral v0.2 and later rotate with rope_theta = 1e6: the mapped layers take it."""
    rope = {"rope_type": "default", "rope_theta": 1e6}
    model = build("mistral", sliding_window=WINDOW, rope_parameters=rope)
    spec, params = from_hf(model)
    assert {s.rope_theta for s in spec.layers} == {1e6}
    tok = tokens()
    want = hf_logits(model, tok)
    assert max_error(memcore_logits(spec, params, tok, backend, form), want) <= TOL[torch.float64]
    if backend == "reference" and form == "parallel":  # the base matters
        default = dataclasses.replace(spec, layers=tuple(
            dataclasses.replace(s, rope_theta=10000.0) for s in spec.layers))
        assert max_error(memcore_logits(default, params, tok, backend, form), want) > 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations_agree(attn):
    model = build("mistral", sliding_window=WINDOW, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    spec, params = from_hf(model)
    tok = tokens(seed=2)
    got = memcore_logits(spec, params, tok, "torch", "parallel")
    assert max_error(got, hf_logits(model, tok)) <= TOL[torch.float64]


def test_window_is_exactly_sliding_window():
    """One token more or less in the window changes the logits: the mapping is not off by one."""
    model = build("mistral", sliding_window=WINDOW)
    spec, params = from_hf(model)
    tok = tokens()
    want = hf_logits(model, tok)
    for w in (WINDOW - 1, WINDOW + 1, None):
        layers = tuple(dataclasses.replace(s, window=w) for s in spec.layers)
        other = dataclasses.replace(spec, layers=layers)
        got = memcore_logits(other, params, tok, "reference", "parallel")
        assert max_error(got[:, :WINDOW - 1], want[:, :WINDOW - 1]) <= 1e-9  # a full window
        assert max_error(got, want) > 1e-4, w


def test_streaming_beyond_the_window_keeps_window_slots():
    model = build("mistral", sliding_window=WINDOW)
    spec, params = from_hf(model)
    lm = memcore.realize(spec, backend="torch", params=params)
    state = lm.init_state(1)
    for t in range(TOKENS):
        _, state = lm.step(torch.tensor([t % 7]), state)
    assert state["layers"][0]["k"].shape == (1, 2, WINDOW, 4)  # [B, n_kv_heads, W, E]


def test_float64_casts_only_round():
    model = build("mistral", sliding_window=WINDOW)
    tok = tokens()
    assert max_error(hf_logits(model, tok, stock=True), hf_logits(model, tok)) <= 1e-5
