"""Model forms (same math as ``memcore.spec.reference.model``):

    h = embed[tokens];  per block i:  h += mixer_i(conv_i(norm1_i(h)));  h += ffn_i(norm2_i(h))
    logits = logit_scale * norm_f(h) @ embed^T         (lm_head^T when not tie_embeddings)

conv_i: the short causal convolution (``short_conv.py``) when short_conv > 0.

State: ``layers`` (and with a persistent FFN ``ffn``), tuples of the layers' array dicts, with
short_conv ``conv`` (each block's last K - 1 conv inputs [B, K - 1, D]), and one ``pos`` for
the whole stack.
"""

from __future__ import annotations

import jax.numpy as jnp
from memcore.spec.layers import Persistent

from . import short_conv as C
from .layers import module, sub
from .numerics import POS_DTYPE, gelu, layer_norm, linear, rms_norm, silu


def _arrays(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "pos"}


def init_state(spec, batch: int, dtype, max_len: int = 0) -> dict:
    def one(s):
        return _arrays(module(s).init_state(s, batch, dtype, max_len))

    state = {"layers": tuple(one(s) for s in spec.layers), "pos": jnp.zeros((), POS_DTYPE)}
    if isinstance(spec.ffn, Persistent):
        state["ffn"] = tuple(one(spec.ffn) for _ in spec.layers)
    if spec.short_conv:
        state["conv"] = tuple(C.init_state(batch, spec.d_model, spec.short_conv, dtype)
                              for _ in spec.layers)
    return state


def _norm(spec, h, w):
    return (rms_norm if spec.norm == "rms" else layer_norm)(h, w, spec.norm_eps)


def _dense_ffn(spec, p, pre, g):
    """The "mlp" or "swiglu" FFN of block ``pre`` on g [..., D]."""
    if spec.ffn == "mlp":
        return linear(gelu(linear(g, p[pre + "ffn.fc1.weight"])), p[pre + "ffn.fc2.weight"])
    return linear(silu(linear(g, p[pre + "ffn.gate_proj.weight"]))
                  * linear(g, p[pre + "ffn.up_proj.weight"]), p[pre + "ffn.down_proj.weight"])


def _run(spec, p, tokens, state, streaming: bool, implementation, positions=None, cu=None):
    """tokens [B, T] (or [B] streaming) -> (logits, state, aux: sum of the layers' aux);
    ``positions`` (flat indices [n] into B * T): the head at those rows only ([n, V]);
    ``cu``: a packed row's checked cu_seqlens (from the empty state)."""
    pos = state["pos"]

    def call(s, params, x, arrays):
        m = module(s)
        st = {**arrays, "pos": pos}
        if streaming:
            return m.step(s, params, x, st)
        if cu is not None:  # every layer restarts at each document
            return m.forward(s, params, x, st, implementation=implementation, cu_seqlens=cu)
        return m.forward(s, params, x, st, implementation=implementation)

    h = jnp.take(p["embed.weight"], tokens, axis=0)
    layers, ffns, convs, aux, end = [], [], [], None, pos
    for i, layer in enumerate(spec.layers):
        pre = f"layers.{i}."
        g = _norm(spec, h, p[pre + "norm1.weight"])
        if spec.short_conv:
            w, past = p[pre + "conv.weight"], state["conv"][i]
            g, past = C.step(g, w, past) if streaming else C.forward(g, w, past, cu)
            convs.append(past)
        y, st, a = call(layer, sub(p, pre + "mixer."), g, state["layers"][i])
        end = st["pos"]
        layers.append(_arrays(st))
        if a is not None:
            aux = a if aux is None else aux + a
        h = h + y
        if spec.ffn is not None:
            g = _norm(spec, h, p[pre + "norm2.weight"])
            if not isinstance(spec.ffn, Persistent):
                h = h + _dense_ffn(spec, p, pre, g)
            else:
                y, st, _ = call(spec.ffn, sub(p, pre + "ffn."), g, state["ffn"][i])
                ffns.append(_arrays(st))
                h = h + y
    if positions is not None:
        h = h.reshape(-1, h.shape[-1])[positions]
    h = _norm(spec, h, p["norm_f.weight"])
    head = p["embed.weight"] if spec.tie_embeddings else p["lm_head.weight"]
    logits = linear(h, head) * spec.logit_scale
    new = {"layers": tuple(layers), "pos": end}
    if isinstance(spec.ffn, Persistent):
        new["ffn"] = tuple(ffns)
    if spec.short_conv:
        new["conv"] = tuple(convs)
    return logits, new, aux


def forward(spec, p, tokens, state, *, implementation="auto", positions=None, cu_seqlens=None):
    """Parallel form: tokens [B, T] -> (logits [B, T, V], state, aux); with ``positions``
    (flat indices [n] into the B * T positions) the logits there only, [n, V].
    ``cu_seqlens`` (checked int32 [N + 1], possibly traced; B = 1, the empty state): documents
    packed in one row, each run as if alone; the state is the last document's."""
    return _run(spec, p, tokens, state, False, implementation, positions, cu_seqlens)


def step(spec, p, tokens_t, state):
    """Streaming form: tokens_t [B] -> (logits [B, V], state, aux)."""
    return _run(spec, p, tokens_t, state, True, None)
