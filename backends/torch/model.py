"""The model composition (DESIGN section 3), exactly as ``memcore.spec.reference.model``:

    h = embed[tokens]
    for each block i:  h = h + mixer_i(conv_i(norm1_i(h)));  h = h + ffn_i(norm2_i(h))  (if ffn)
    logits = logit_scale * norm_f(h) @ embed^T         (lm_head^T when not tie_embeddings)

on parameters by ``memcore.init``'s names, already in the accumulation dtype (conv_i: the short
causal convolution, ``short_conv.py``, with short_conv > 0). States: ``pos``, ``spec_id``,
``layers`` (a tuple of layer states), with a persistent FFN ``ffn``, with short_conv ``conv``
(each block's last short_conv - 1 conv inputs [B, K - 1, D]).
"""

from __future__ import annotations

import torch
from memcore.spec.layers import Persistent

from . import layers
from . import short_conv as C
from .numerics import gelu, layer_norm, linear, rms_norm, silu
from .params import sub

META = ("pos", "spec_id")


def persistent_ffn(spec) -> bool:
    return isinstance(spec.ffn, Persistent)


def init_state(spec, batch: int, *, dtype, device) -> dict:
    """The state before any token, arrays in ``dtype`` (the accumulation dtype)."""
    state = {"pos": 0, "spec_id": spec.spec_id,
             "layers": tuple(layers.init_state(s, batch, dtype=dtype, device=device)
                             for s in spec.layers)}
    if persistent_ffn(spec):
        state["ffn"] = tuple(layers.init_state(spec.ffn, batch, dtype=dtype, device=device)
                             for _ in spec.layers)
    if spec.short_conv:
        state["conv"] = tuple(C.init_state(batch, spec.d_model, spec.short_conv, dtype=dtype,
                                           device=device) for _ in spec.layers)
    return state


def own_storage(arrays: dict) -> dict:
    """The arrays, each on memory of its own and off any autograd graph: a step in place
    writes every array, but an empty state may share one zero tensor between several arrays
    (as the reference builds it), a parallel form may hand back views that share a buffer, and
    a state from a differentiable call may be saved for its backward. Only those are copied
    (once: the copies are what the state holds afterwards)."""
    out, seen = dict(arrays), set()
    for key, a in arrays.items():
        if not isinstance(a, torch.Tensor) or not a.numel():
            continue
        ptr = a.untyped_storage().data_ptr()
        if ptr in seen or a.requires_grad:
            out[key] = a.detach().clone()
        else:
            seen.add(ptr)
    return out


def run_layer(spec, p, x, state, streaming: bool, inplace: bool = False, bounds=None):
    """One layer on the accumulation dtype: (y, new state with ``spec_id``, aux). With
    ``inplace`` (streaming only) ``state`` itself is updated and returned. ``bounds``: a
    packed row's checked cu_seqlens (``state`` is then the empty state)."""
    mod = layers.module(spec)
    st = {k: v for k, v in state.items() if k != "spec_id"}
    if bounds is not None:
        y, arrays, aux = mod.forward(spec, p, x, st, bounds)
    elif not streaming:
        y, arrays, aux = mod.forward(spec, p, x, st)
    else:
        if inplace:
            st = own_storage(st)
        y, arrays, aux = mod.step(spec, p, x, st, inplace=inplace)
    new = state if inplace else {}
    new.update(arrays)
    new["spec_id"] = spec.spec_id
    return y, new, aux


def _norm(spec, h, w):
    return (rms_norm if spec.norm == "rms" else layer_norm)(h, w, spec.norm_eps)


def _dense_ffn(spec, p, pre, g):
    """The "mlp" or "swiglu" FFN of block ``pre`` on g [..., D]."""
    if spec.ffn == "mlp":
        return linear(gelu(linear(g, p[pre + "ffn.fc1.weight"])), p[pre + "ffn.fc2.weight"])
    return linear(silu(linear(g, p[pre + "ffn.gate_proj.weight"]))
                  * linear(g, p[pre + "ffn.up_proj.weight"]), p[pre + "ffn.down_proj.weight"])


def run(spec, p, tokens, state, streaming: bool, inplace: bool = False,
        logits_to_keep: int = 0, bounds=None, positions=None):
    """tokens [B, T] (or [B] streaming) -> (logits, new state, aux summed over the layers or
    None); with ``inplace`` the layer states are updated where they are. ``bounds``: a packed
    row's checked cu_seqlens (from the empty ``state``; the state returned is the last
    document's). ``positions`` (parallel form): flat indices [n] into the B * T positions,
    the only rows of the head ([n, V] logits)."""
    h = p["embed.weight"][tokens]
    pos = state["pos"]
    new_layers, new_ffn, new_conv, aux = [], [], [], None
    for i, lspec in enumerate(spec.layers):
        pre = f"layers.{i}."
        g = _norm(spec, h, p[pre + "norm1.weight"])
        if spec.short_conv:
            w, past = p[pre + "conv.weight"], state["conv"][i]
            if inplace and past.requires_grad:  # saved for a backward: shift a copy
                past = past.detach().clone()
            g, past = C.step(g, w, past, inplace) if streaming else C.forward(g, w, past, bounds)
            new_conv.append(past)
        y, st, a = run_layer(lspec, sub(p, pre + "mixer."), g, state["layers"][i], streaming,
                             inplace, bounds)
        new_layers.append(st)
        if a is not None:
            aux = a if aux is None else aux + a
        h = h + y
        if spec.ffn is not None:
            g = _norm(spec, h, p[pre + "norm2.weight"])
            if not persistent_ffn(spec):
                h = h + _dense_ffn(spec, p, pre, g)
            else:
                y, st, _ = run_layer(spec.ffn, sub(p, pre + "ffn."), g, state["ffn"][i],
                                     streaming, inplace, bounds)
                new_ffn.append(st)
                h = h + y
    if logits_to_keep:  # the head only where logits are wanted (e.g. a prompt's last token)
        h = h[:, -logits_to_keep:]
    if positions is not None:  # e.g. a task's labelled positions only
        h = h.reshape(-1, h.shape[-1])[positions]
    h = _norm(spec, h, p["norm_f.weight"])
    head = p["embed.weight"] if spec.tie_embeddings else p["lm_head.weight"]
    logits = linear(h, head) * spec.logit_scale
    n = 1 if streaming else tokens.shape[1]
    if bounds is not None:
        n = bounds[-1] - bounds[-2]
    if inplace:
        state["pos"] = pos + n
        if new_conv:
            state["conv"] = tuple(new_conv)
        return logits, state, aux
    new = {"pos": pos + n, "spec_id": spec.spec_id, "layers": tuple(new_layers)}
    if new_ffn:
        new["ffn"] = tuple(new_ffn)
    if new_conv:
        new["conv"] = tuple(new_conv)
    return logits, new, aux


def check_positions(positions, tokens, logits_to_keep: int) -> None:
    """``positions``: a 1-D integer tensor of flat indices into the B * T positions of
    ``tokens``, on their device; not together with ``logits_to_keep``."""
    if not isinstance(positions, torch.Tensor) or positions.ndim != 1 or \
            positions.dtype.is_floating_point or positions.dtype.is_complex or \
            positions.dtype == torch.bool:
        raise ValueError(f"positions must be a 1-D integer tensor of flat indices into the "
                         f"B * T positions, got {type(positions).__name__} "
                         f"{getattr(positions, 'dtype', '')} "
                         f"{tuple(getattr(positions, 'shape', ()))}")
    if logits_to_keep:
        raise ValueError("positions and logits_to_keep both choose the head's rows: pass one")
    n = tokens.numel()
    if positions.device != tokens.device:
        raise ValueError(f"positions are on {positions.device}, the tokens on {tokens.device}")
    if positions.numel() and bool(((positions < 0) | (positions >= n)).any()):
        raise ValueError(f"positions must lie in [0, B * T = {n}), got values from "
                         f"{int(positions.min())} to {int(positions.max())}")
