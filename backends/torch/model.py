"""``nn.Module`` realization of a model spec, exactly as ``memcore.spec.reference.model``:

    h = embed[tokens]
    for each block i:  h = h + mixer_i(norm1_i(h));  h = h + ffn_i(norm2_i(h))  (if ffn)
    logits = logit_scale * norm_f(h) @ embed^T
"""

from __future__ import annotations

import torch
from memcore.spec.model import Model
from memcore.spec.params import check_params
from memcore.spec.validate import check_tokens
from torch import nn

from ._util import (
    acc_dtype,
    gelu,
    layer_norm,
    linear,
    param_dict,
    register_params,
    rms_norm,
    step_params,
    sub,
)
from .layers import TorchLayer, check_inplace, private_state


class TorchModel(nn.Module):
    """Token ids in, logits out; ``forward``, ``step``, ``init_state`` and ``generate``."""

    backend = "torch"

    def __init__(self, spec: Model, params: dict):
        super().__init__()
        check_params(spec, params)
        self.spec = spec
        self.spec_id = spec.spec_id
        self._persistent = spec.ffn is not None and spec.ffn != "mlp"
        layers = nn.Module()
        for i, layer in enumerate(spec.layers):
            block = nn.Module()
            block.add_module("mixer", TorchLayer(layer, sub(params, f"layers.{i}.mixer.")))
            if self._persistent:
                block.add_module("ffn", TorchLayer(spec.ffn, sub(params, f"layers.{i}.ffn.")))
            layers.add_module(str(i), block)
        self.add_module("layers", layers)
        owned = ("mixer.",) + (("ffn.",) if self._persistent else ())
        rest = {n: a for n, a in params.items()
                if not (n.startswith("layers.") and n.split(".", 2)[2].startswith(owned))}
        register_params(self, rest)
        self.aux_loss = None

    def _blocks(self):
        return [self.layers._modules[str(i)] for i in range(self.spec.n_layers)]

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        """The state before any token; ``dtype`` is the compute dtype (default: the
        parameters'), the state's arrays use its accumulation dtype."""
        blocks = self._blocks()
        state = {"pos": 0, "spec_id": self.spec_id,
                 "layers": tuple(b.mixer.init_state(batch_size, device, dtype) for b in blocks)}
        if self._persistent:
            state["ffn"] = tuple(b.ffn.init_state(batch_size, device, dtype) for b in blocks)
        return state

    def _check_state(self, state, B, dtype, device):
        spec = self.spec
        if not isinstance(state, dict) or state.get("spec_id") != self.spec_id:
            got = state.get("spec_id") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state was made for another spec ({got!r}); this model has "
                             f"spec_id {spec.spec_id!r}")
        for key in ("layers",) + (("ffn",) if self._persistent else ()):
            if not isinstance(state.get(key), (tuple, list)) or len(state[key]) != spec.n_layers:
                raise ValueError(f"state[{key!r}] must hold {spec.n_layers} layer states, got "
                                 f"{state.get(key)!r:.80}")
        for i, b in enumerate(self._blocks()):
            b.mixer.check_state(state["layers"][i], B, dtype, device, f"state['layers'][{i}]")
            if self._persistent:
                b.ffn.check_state(state["ffn"][i], B, dtype, device, f"state['ffn'][{i}]")

    def _norm(self, h, w):
        return rms_norm(h, w) if self.spec.norm == "rms" else layer_norm(h, w)

    def _run(self, tokens, state, streaming: bool, inplace: bool = False,
             logits_to_keep: int = 0):
        if inplace:
            check_inplace()
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or \
                logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got "
                             f"{logits_to_keep!r}")
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got "
                            f"{type(tokens).__name__}")
        check_tokens(self.spec, tokens, streaming=streaming)
        w = self.embed.weight
        if tokens.device != w.device:
            raise ValueError(f"tokens are on device {tokens.device}, but the parameters are on "
                             f"{w.device}")
        V = self.spec.vocab_size
        if tokens.numel() and bool(((tokens < 0) | (tokens >= V)).any()):
            raise ValueError(f"tokens must lie in [0, vocab_size={V}), got values from "
                             f"{int(tokens.min())} to {int(tokens.max())}")
        acc = acc_dtype(w.dtype)
        B = tokens.shape[0]
        if state is None:
            state = self.init_state(B, tokens.device, acc)
        else:
            self._check_state(state, B, acc, tokens.device)
        p = step_params(self, acc) if streaming else param_dict(self, acc)
        h = p["embed.weight"][tokens]
        pos = state["pos"]
        new_layers, new_ffn, aux = [], [], None
        for i, block in enumerate(self._blocks()):
            pre = f"layers.{i}."
            st = state["layers"][i]
            g = self._norm(h, p[pre + "norm1.weight"])
            y, arrays, a = block.mixer.run(sub(p, pre + "mixer."), g, _arrays(st), st["pos"],
                                           streaming, inplace)
            new_layers.append(_state(block.mixer, arrays, st, h, streaming, inplace))
            if a is not None:
                aux = a if aux is None else aux + a
            h = h + y
            if self.spec.ffn is not None:
                g = self._norm(h, p[pre + "norm2.weight"])
                if self.spec.ffn == "mlp":
                    h = h + linear(gelu(linear(g, p[pre + "ffn.fc1.weight"])),
                                   p[pre + "ffn.fc2.weight"])
                else:
                    st = state["ffn"][i]
                    y, arrays, _ = block.ffn.run(sub(p, pre + "ffn."), g, _arrays(st),
                                                 st["pos"], streaming, inplace)
                    new_ffn.append(_state(block.ffn, arrays, st, h, streaming, inplace))
                    h = h + y
        if logits_to_keep:  # the head only where logits are wanted (e.g. a prompt's last token)
            h = h[:, -logits_to_keep:]
        h = self._norm(h, p["norm_f.weight"])
        logits = linear(h, p["embed.weight"]) * self.spec.logit_scale
        n = 1 if streaming else tokens.shape[1]
        if inplace:  # the layer states were updated where they are
            state["pos"] = pos + n
            return logits, state
        new = {"pos": pos + n, "spec_id": self.spec_id, "layers": tuple(new_layers)}
        if new_ffn:
            new["ffn"] = tuple(new_ffn)
        self.aux_loss = aux
        return logits, new

    def forward(self, tokens, state=None, *, logits_to_keep: int = 0):
        """tokens [B, T] ints -> (logits [B, T, V], final state). ``logits_to_keep=n > 0``
        returns the logits of the last n positions only ([B, min(n, T), V]), sparing the head's
        matmul elsewhere; the state is the same."""
        return self._run(tokens, state, streaming=False, logits_to_keep=logits_to_keep)

    def step(self, tokens_t, state=None, *, inplace: bool = False):
        """tokens_t [B] ints -> (logits [B, V], state). Functional by default (a new state,
        ``state`` untouched, differentiable); ``inplace=True`` (under ``torch.no_grad()``)
        updates ``state`` itself and returns it, as ``TorchLayer.step`` does: no state
        tensor is reallocated."""
        return self._run(tokens_t, state, streaming=True, inplace=inplace)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, state=None):
        """Continue ``tokens`` [B, T] by ``max_new_tokens``: greedy (argmax) with
        temperature 0, else sampling from softmax(logits / temperature) with ``generator``.
        The prompt runs in the parallel form, each new token through ``step`` in place, on a
        private copy of the state: ``state`` is left as it was.
        Returns [B, T + max_new_tokens]."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got "
                             f"{max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not temperature >= 0:
            raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        logits, state = self(tokens, state, logits_to_keep=1)
        # The parallel form may return arrays of the caller's state (e.g. a store that no
        # chunk end changed) or views of one buffer: step a copy that owns its memory.
        state = private_state(state)
        last = logits[:, -1]
        out = [tokens]
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = last.argmax(-1)
            else:
                probs = torch.softmax(last.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            nxt = nxt.to(tokens.dtype)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                last, state = self.step(nxt, state, inplace=True)
        return torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return repr(self.spec)


def _arrays(state):
    return {k: v for k, v in state.items() if k not in ("pos", "spec_id")}


def _state(layer, arrays, old, h, streaming, inplace=False):
    new = old if inplace else {}
    new.update({"pos": old["pos"] + (1 if streaming else h.shape[1]),
                "spec_id": layer.spec_id})
    new.update(arrays)
    return new
