"""Model-level reference: embedding, pre-norm residual blocks, tied head; both forms.

    h = embed[tokens]
    for each block i:  h = h + mixer_i(norm1_i(h));  h = h + ffn_i(norm2_i(h))  (if ffn)
    logits = logit_scale * norm_f(h) @ embed^T

State: ``pos``, ``spec_id``, ``layers`` (a tuple of mixer states) and, with a persistent
FFN, ``ffn`` (a tuple of its states: its key extractor carries a leaky average).
"""

from __future__ import annotations

import numpy as np

from ..layers import Persistent
from ..params import check_params
from ..validate import check_tokens
from . import layers as L
from .numerics import acc_dtype, device, gelu, layer_norm, linear, namespace, params_as, rms_norm


def _sub(p: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def _float_like(xp, params, tokens):
    w = params["embed.weight"]
    if isinstance(w, np.ndarray):
        dt = xp.float64 if w.dtype == np.float64 else xp.float32
    else:
        dt = acc_dtype(xp, w.dtype)
    return xp.zeros((1,), dtype=dt, device=device(tokens))


def init_state(spec, batch: int, like):
    layers = tuple(L.init_state(layer, batch, like) for layer in spec.layers)
    state = {"pos": 0, "spec_id": spec.spec_id, "layers": layers}
    if isinstance(spec.ffn, Persistent):
        state["ffn"] = tuple(L.init_state(spec.ffn, batch, like) for _ in spec.layers)
    return state


def _check_model_state(spec, state):
    if not isinstance(state, dict) or state.get("spec_id") != spec.spec_id:
        got = state.get("spec_id") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state was made for another spec ({got!r}); this model has spec_id "
                         f"{spec.spec_id!r}")
    if len(state["layers"]) != spec.n_layers:
        raise ValueError(f"state['layers'] has {len(state['layers'])} entries, expected "
                         f"{spec.n_layers}")


def _norm(xp, spec, h, w):
    return rms_norm(xp, h, w) if spec.norm == "rms" else layer_norm(xp, h, w)


def _run(spec, params, tokens, state, streaming: bool):
    check_tokens(spec, tokens, streaming=streaming)
    xp = namespace(tokens)
    check_params(spec, params)
    like = _float_like(xp, params, tokens)
    p = params_as(xp, params, like)
    B = tokens.shape[0]
    if state is None:
        state = init_state(spec, B, like)
    _check_model_state(spec, state)
    V = spec.vocab_size
    flat = xp.reshape(tokens, (-1,))
    if bool(xp.any((flat < 0) | (flat >= V))):
        raise ValueError(f"tokens must lie in [0, vocab_size={V})")
    h = xp.take(p["embed.weight"], flat, axis=0)
    h = xp.reshape(h, tuple(tokens.shape) + (spec.d_model,))
    run = L.step_aux if streaming else L.forward_aux
    new_layers, new_ffn, aux = [], [], []
    for i, layer in enumerate(spec.layers):
        pre = f"layers.{i}."
        y, st, a = run(layer, _sub(p, pre + "mixer."), _norm(xp, spec, h, p[pre + "norm1.weight"]),
                       state["layers"][i])
        new_layers.append(st)
        if a is not None:
            aux.append(a)
        h = h + y
        if spec.ffn is not None:
            g = _norm(xp, spec, h, p[pre + "norm2.weight"])
            if spec.ffn == "mlp":
                h = h + linear(xp, gelu(xp, linear(xp, g, p[pre + "ffn.fc1.weight"])),
                               p[pre + "ffn.fc2.weight"])
            else:
                y, st, _ = run(spec.ffn, _sub(p, pre + "ffn."), g, state["ffn"][i])
                new_ffn.append(st)
                h = h + y
    h = _norm(xp, spec, h, p["norm_f.weight"])
    logits = linear(xp, h, p["embed.weight"]) * spec.logit_scale
    n = 1 if streaming else tokens.shape[1]
    new = {"pos": state["pos"] + n, "spec_id": spec.spec_id, "layers": tuple(new_layers)}
    if new_ffn:
        new["ffn"] = tuple(new_ffn)
    total_aux = None
    if aux:
        total_aux = aux[0]
        for a in aux[1:]:
            total_aux = total_aux + a
    return logits, new, total_aux


def forward_aux(spec, params, tokens, state=None):
    """tokens [B, T] ints -> (logits [B, T, V], state, aux: the sum of the layers' aux losses)."""
    return _run(spec, params, tokens, state, streaming=False)


def step_aux(spec, params, tokens_t, state=None):
    """tokens_t [B] ints -> (logits [B, V], state, aux)."""
    return _run(spec, params, tokens_t, state, streaming=True)


def forward(spec, params, tokens, state=None):
    logits, state, _ = forward_aux(spec, params, tokens, state)
    return logits, state


def step(spec, params, tokens_t, state=None):
    logits, state, _ = step_aux(spec, params, tokens_t, state)
    return logits, state
