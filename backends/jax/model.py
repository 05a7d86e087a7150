"""Model forms (same math as ``memcore.spec.reference.model``):

    h = embed[tokens];  per block i:  h += mixer_i(norm1_i(h));  h += ffn_i(norm2_i(h))
    logits = logit_scale * norm_f(h) @ embed^T

and the layer dispatch shared with ``realize``: ``layer_forward`` / ``layer_step`` take
(spec, params, x, arrays, pos) and return (y, arrays, aux or None).
"""

from __future__ import annotations

import jax.numpy as jnp
from memcore.spec.layers import Persistent

from . import mamba, mosaic, windowed
from ._base import gelu, layer_norm, linear, rms_norm
from .state import kind
from .windowed import sub


def layer_forward(spec, p, x, arrays, pos):
    k = kind(spec)
    if k == "windowed":
        return windowed.forward(spec, p, x, arrays, pos)
    if k == "mamba":
        return (*mamba.forward(spec, p, x, arrays), None)
    if k == "mosaic":
        return (*mosaic.forward(spec, p, x, arrays, pos), None)
    return (*mosaic.persistent_forward(spec, p, x, arrays), None)


def layer_step(spec, p, x_t, arrays, pos):
    k = kind(spec)
    if k == "windowed":
        return windowed.step(spec, p, x_t, arrays, pos)
    if k == "mamba":
        return (*mamba.step(spec, p, x_t, arrays), None)
    if k == "mosaic":
        return (*mosaic.step(spec, p, x_t, arrays, pos), None)
    return (*mosaic.persistent_step(spec, p, x_t, arrays), None)


def _norm(spec, h, w):
    return rms_norm(h, w) if spec.norm == "rms" else layer_norm(h, w)


def run(spec, p, tokens, arrays, pos, streaming: bool):
    """tokens [B, T] (or [B] streaming) -> (logits, arrays, aux: sum of the layers' aux)."""
    h = jnp.take(p["embed.weight"], tokens, axis=0)
    fn = layer_step if streaming else layer_forward
    layers, ffns, aux = [], [], None
    for i, layer in enumerate(spec.layers):
        pre = f"layers.{i}."
        y, st, a = fn(layer, sub(p, pre + "mixer."), _norm(spec, h, p[pre + "norm1.weight"]),
                      arrays["layers"][i], pos)
        layers.append(st)
        if a is not None:
            aux = a if aux is None else aux + a
        h = h + y
        if spec.ffn is not None:
            g = _norm(spec, h, p[pre + "norm2.weight"])
            if spec.ffn == "mlp":
                h = h + linear(gelu(linear(g, p[pre + "ffn.fc1.weight"])),
                               p[pre + "ffn.fc2.weight"])
            else:
                y, st, _ = fn(spec.ffn, sub(p, pre + "ffn."), g, arrays["ffn"][i], pos)
                ffns.append(st)
                h = h + y
    h = _norm(spec, h, p["norm_f.weight"])
    logits = linear(h, p["embed.weight"]) * spec.logit_scale
    new = {"layers": tuple(layers)}
    if isinstance(spec.ffn, Persistent):
        new["ffn"] = tuple(ffns)
    return logits, new, aux
