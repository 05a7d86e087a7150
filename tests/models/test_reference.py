"""The reference model: embedding, pre-norm blocks and tied head written out from the layer
reference, and its input and state errors."""

from __future__ import annotations

import numpy as np
import plain
import pytest
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import layers as L
from memcore.spec.reference import model as M
from refcheck import assert_close, inputs, model_specs, params64

from memcore import spec as S

seeds = st.integers(0, 2 ** 16)


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


def test_model_tokens():
    spec = S.model([S.transformer(4, 2)], vocab_size=5)
    p = params64(spec)
    with pytest.raises(TypeError, match=r"tokens must hold integer token ids, got dtype float"):
        M.forward(spec, p, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, T\]"):
        M.forward(spec, p, np.zeros((3,), dtype=np.int64))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=5\)"):
        M.forward(spec, p, np.array([[0, 5]]))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=5\)"):
        M.step(spec, p, np.array([-1]))


def test_model_state_from_another_spec():
    a = S.model([S.transformer(4, 2)], vocab_size=5)
    b = S.model([S.transformer(4, 2, window=2)], vocab_size=5)
    _, state = M.forward(a, params64(a), np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"state was made for another spec"):
        M.forward(b, params64(b), np.array([[1, 2]]), state)
