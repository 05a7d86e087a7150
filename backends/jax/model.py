"""Model forms (same math as ``memcore.spec.reference.model``):

    h = embed[tokens];  per block i:  h += mixer_i(norm1_i(h));  h += ffn_i(norm2_i(h))
    logits = logit_scale * norm_f(h) @ embed^T         (lm_head^T when not tie_embeddings)

State: ``layers`` (and with a persistent FFN ``ffn``), tuples of the layers' array dicts, and
one ``pos`` for the whole stack.
"""

from __future__ import annotations

import jax.numpy as jnp
from memcore.spec.layers import Persistent

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
    return state


def _norm(spec, h, w):
    return (rms_norm if spec.norm == "rms" else layer_norm)(h, w, spec.norm_eps)


def _dense_ffn(spec, p, pre, g):
    """The "mlp" or "swiglu" FFN of block ``pre`` on g [..., D]."""
    if spec.ffn == "mlp":
        return linear(gelu(linear(g, p[pre + "ffn.fc1.weight"])), p[pre + "ffn.fc2.weight"])
    return linear(silu(linear(g, p[pre + "ffn.gate_proj.weight"]))
                  * linear(g, p[pre + "ffn.up_proj.weight"]), p[pre + "ffn.down_proj.weight"])


def _run(spec, p, tokens, state, streaming: bool, implementation):
    """tokens [B, T] (or [B] streaming) -> (logits, state, aux: sum of the layers' aux)."""
    pos = state["pos"]

    def call(s, params, x, arrays):
        m = module(s)
        st = {**arrays, "pos": pos}
        if streaming:
            return m.step(s, params, x, st)
        return m.forward(s, params, x, st, implementation=implementation)

    h = jnp.take(p["embed.weight"], tokens, axis=0)
    layers, ffns, aux, end = [], [], None, pos
    for i, layer in enumerate(spec.layers):
        pre = f"layers.{i}."
        y, st, a = call(layer, sub(p, pre + "mixer."), _norm(spec, h, p[pre + "norm1.weight"]),
                        state["layers"][i])
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
    h = _norm(spec, h, p["norm_f.weight"])
    head = p["embed.weight"] if spec.tie_embeddings else p["lm_head.weight"]
    logits = linear(h, head) * spec.logit_scale
    new = {"layers": tuple(layers), "pos": end}
    if isinstance(spec.ffn, Persistent):
        new["ffn"] = tuple(ffns)
    return logits, new, aux


def forward(spec, p, tokens, state, *, implementation="auto"):
    """Parallel form: tokens [B, T] -> (logits [B, T, V], state, aux)."""
    return _run(spec, p, tokens, state, False, implementation)


def step(spec, p, tokens_t, state):
    """Streaming form: tokens_t [B] -> (logits [B, V], state, aux)."""
    return _run(spec, p, tokens_t, state, True, None)
