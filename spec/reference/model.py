"""Model-level reference: embedding, pre-norm residual blocks, tied head; both forms.

    h = embed[tokens]
    for each block i:  h = h + mixer_i(conv_i(norm1_i(h)));  h = h + ffn_i(norm2_i(h))  (if ffn)
    logits = logit_scale * norm_f(h) @ embed^T         (lm_head^T when not tie_embeddings)

ffn: "mlp" fc2(gelu(fc1(g))), "swiglu" down_proj(silu(gate_proj(g)) * up_proj(g)), or a
persistent layer. Every norm takes the model's norm_eps. conv_i is the short causal depthwise
convolution of width short_conv (``short_conv.py``; none when short_conv is 0).

State: ``pos``, ``spec_id``, ``layers`` (a tuple of mixer states), with a persistent FFN
``ffn`` (a tuple of its states: its key extractor carries a leaky average), and with
short_conv = K > 0 ``conv`` (a tuple of each block's last K - 1 conv inputs [B, K - 1, D]).
"""

from __future__ import annotations

import numpy as np

from ..layers import Persistent
from ..params import check_params
from ..validate import check_tokens
from . import layers as L
from . import short_conv as C
from .numerics import (
    acc_dtype,
    device,
    gelu,
    layer_norm,
    linear,
    namespace,
    params_as,
    rms_norm,
    silu,
)
from .packed import check_cu_seqlens, packed_array


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
    if spec.short_conv:
        xp = namespace(like)
        state["conv"] = tuple(C.init_state(xp, batch, spec.d_model, spec.short_conv, like)
                              for _ in spec.layers)
    return state


def _check_model_state(spec, state, batch: int):
    if not isinstance(state, dict) or state.get("spec_id") != spec.spec_id:
        got = state.get("spec_id") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state was made for another spec ({got!r}); this model has spec_id "
                         f"{spec.spec_id!r}")
    if len(state["layers"]) != spec.n_layers:
        raise ValueError(f"state['layers'] has {len(state['layers'])} entries, expected "
                         f"{spec.n_layers}")
    if spec.short_conv:
        want = (batch, spec.short_conv - 1, spec.d_model)
        conv = state.get("conv")
        shapes = [tuple(c.shape) for c in conv] if isinstance(conv, (tuple, list)) else conv
        if not isinstance(conv, (tuple, list)) or shapes != [want] * spec.n_layers:
            raise ValueError(f"state['conv'] must hold {spec.n_layers} arrays of shape {want} "
                             f"(each block's last short_conv - 1 inputs), got {shapes!r:.80}")


def _norm(xp, spec, h, w):
    norm = rms_norm if spec.norm == "rms" else layer_norm
    return norm(xp, h, w, spec.norm_eps)


def _dense_ffn(xp, spec, p, pre, g):
    """The "mlp" or "swiglu" FFN of block ``pre`` on g [..., D]."""
    if spec.ffn == "mlp":
        return linear(xp, gelu(xp, linear(xp, g, p[pre + "ffn.fc1.weight"])),
                      p[pre + "ffn.fc2.weight"])
    gate = silu(xp, linear(xp, g, p[pre + "ffn.gate_proj.weight"]))
    return linear(xp, gate * linear(xp, g, p[pre + "ffn.up_proj.weight"]),
                  p[pre + "ffn.down_proj.weight"])


def _run(spec, params, tokens, state, streaming: bool, cu_seqlens=None):
    check_tokens(spec, tokens, streaming=streaming)
    xp = namespace(tokens)
    bounds = None if streaming else check_cu_seqlens(cu_seqlens, tokens.shape[1],
                                                     tokens.shape[0], state)
    check_params(spec, params)
    like = _float_like(xp, params, tokens)
    p = params_as(xp, params, like)
    B = tokens.shape[0]
    if state is None:
        state = init_state(spec, B, like)
    _check_model_state(spec, state, B)
    V = spec.vocab_size
    flat = xp.reshape(tokens, (-1,))
    if bool(xp.any((flat < 0) | (flat >= V))):
        raise ValueError(f"tokens must lie in [0, vocab_size={V})")
    h = xp.take(p["embed.weight"], flat, axis=0)
    h = xp.reshape(h, tuple(tokens.shape) + (spec.d_model,))
    run = L.step_aux if streaming else L.forward_aux
    if bounds is not None:  # every layer restarts at each document, from the empty state
        cu = packed_array(bounds)

        def run(s, p_, x, _state):
            return L.forward_aux(s, p_, x, None, cu)
    new_layers, new_ffn, new_conv, aux = [], [], [], []
    for i, layer in enumerate(spec.layers):
        pre = f"layers.{i}."
        g = _norm(xp, spec, h, p[pre + "norm1.weight"])
        if spec.short_conv:
            w, past = p[pre + "conv.weight"], state["conv"][i]
            g, past = C.step(xp, g, w, past) if streaming else C.forward(xp, g, w, past, bounds)
            new_conv.append(past)
        y, st, a = run(layer, _sub(p, pre + "mixer."), g, state["layers"][i])
        new_layers.append(st)
        if a is not None:
            aux.append(a)
        h = h + y
        if spec.ffn is not None:
            g = _norm(xp, spec, h, p[pre + "norm2.weight"])
            if spec.ffn in ("mlp", "swiglu"):
                h = h + _dense_ffn(xp, spec, p, pre, g)
            else:
                y, st, _ = run(spec.ffn, _sub(p, pre + "ffn."), g, state["ffn"][i])
                new_ffn.append(st)
                h = h + y
    h = _norm(xp, spec, h, p["norm_f.weight"])
    head = p["embed.weight"] if spec.tie_embeddings else p["lm_head.weight"]
    logits = linear(xp, h, head) * spec.logit_scale
    n = 1 if streaming else tokens.shape[1]
    if bounds is not None:
        n = bounds[-1] - bounds[-2]
    new = {"pos": state["pos"] + n, "spec_id": spec.spec_id, "layers": tuple(new_layers)}
    if new_ffn:
        new["ffn"] = tuple(new_ffn)
    if new_conv:
        new["conv"] = tuple(new_conv)
    total_aux = None
    if aux:
        total_aux = aux[0]
        for a in aux[1:]:
            total_aux = total_aux + a
    return logits, new, total_aux


def forward_aux(spec, params, tokens, state=None, cu_seqlens=None):
    """tokens [B, T] ints -> (logits [B, T, V], state, aux: the sum of the layers' aux losses).
    ``cu_seqlens`` (int32 [N + 1], B = 1, state None): documents packed in one row, each run
    as if alone from the empty state; the state is the last document's."""
    return _run(spec, params, tokens, state, streaming=False, cu_seqlens=cu_seqlens)


def step_aux(spec, params, tokens_t, state=None):
    """tokens_t [B] ints -> (logits [B, V], state, aux)."""
    return _run(spec, params, tokens_t, state, streaming=True)


def forward(spec, params, tokens, state=None, cu_seqlens=None):
    logits, state, _ = forward_aux(spec, params, tokens, state, cu_seqlens)
    return logits, state


def step(spec, params, tokens_t, state=None):
    logits, state, _ = step_aux(spec, params, tokens_t, state)
    return logits, state
