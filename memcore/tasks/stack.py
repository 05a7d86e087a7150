"""A language model assembled from realized torch mixer layers, for the tasks.

    h = embed[tokens]
    for each block i:  h = h + mixer_i(conv_i(norm1_i(h)))     (conv_i only with short_conv)
    logits = logit_scale * norm_f(h) @ embed^T                  (tied head)

Without ``short_conv`` this is exactly the torch realization of the model spec (same parameter
names and values). The optional short causal depthwise convolution before each mixer is not a
memcore layer spec: it is the tasks' own addition (Zoology and the Based paper hybridise their
mixers with such a convolution), so recall is learnable in minutes on a CPU.

The head can be evaluated at selected positions only: at an 8192-way vocabulary the head
dominates the cost, and MQAR's loss uses only the labelled positions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import memcore
from memcore.backends.torch.numerics import layer_norm, rms_norm
from memcore.spec.model import Model
from memcore.tasks import model_args


def _norm(kind: str, x, w):
    # The torch model realization's norms: without short_conv the stack is that realization.
    return rms_norm(x, w) if kind == "rms" else layer_norm(x, w)


def _conv(x, w):
    # Causal depthwise: y_t = sum_k w[:, k] x_{t-K+1+k}; left zero padding.
    K = w.shape[1]
    xt = torch.nn.functional.pad(x.transpose(1, 2), (K - 1, 0))
    return torch.nn.functional.conv1d(xt, w[:, None, :], groups=w.shape[0]).transpose(1, 2)


def _state_bytes(mixer, g):
    # run_blocks' mix for state_bytes: the mixer's output and its streaming state's bytes.
    y, state = mixer(g)
    return y, sum(a.numel() * a.element_size() for a in state.values()
                  if isinstance(a, torch.Tensor))


class TaskLM(nn.Module):
    """Token ids [B, T] -> hidden states or logits, from a mixer-only model spec."""

    def __init__(self, spec: Model, params: dict | None = None, seed: int = 0,
                 short_conv: int = 0):
        super().__init__()
        params = model_args.check_task_model("TaskLM", spec, params, seed, short_conv)
        self.spec = spec
        self.short_conv = short_conv
        t = {n: torch.as_tensor(np.asarray(a, dtype=np.float32)) for n, a in params.items()}
        self.embed = nn.Parameter(t["embed.weight"].clone())
        self.norm_f = nn.Parameter(t["norm_f.weight"].clone())
        self.norms = nn.ParameterList()
        self.mixers = nn.ModuleList()
        self.convs = nn.ParameterList()
        D = spec.d_model
        gen = torch.Generator().manual_seed(int(seed) + 7919)
        for i, layer in enumerate(spec.layers):
            pre = f"layers.{i}.mixer."
            sub = {n[len(pre):]: a for n, a in params.items() if n.startswith(pre)}
            self.norms.append(nn.Parameter(t[f"layers.{i}.norm1.weight"].clone()))
            self.mixers.append(memcore.realize(layer, backend="torch", params=sub))
            if short_conv:
                # Depthwise conv1d's default init, U(-1/sqrt(K), 1/sqrt(K)).
                bound = 1.0 / math.sqrt(short_conv)
                w = (torch.rand(D, short_conv, generator=gen) * 2 - 1) * bound
                self.convs.append(nn.Parameter(w))
        self.aux_loss = None

    def hidden(self, tokens):
        """tokens [B, T] -> final normed hidden states [B, T, D]; sets ``aux_loss`` (the sum
        of the bmojo layers' innovation losses, or None)."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
            raise ValueError(f"tokens must be a [batch, T] torch tensor of ids, got "
                             f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
        if tokens.numel():
            model_args.check_token_range(int(tokens.min()), int(tokens.max()),
                                         self.spec.vocab_size)
        h, auxes = model_args.run_blocks(self, self.embed[tokens], _norm, _conv,
                                         model_args.forward_aux)
        self.aux_loss = model_args.sum_aux(auxes)
        return _norm(self.spec.norm, h, self.norm_f)

    def head(self, h):
        return (h @ self.embed.T) * self.spec.logit_scale

    def forward(self, tokens, mask=None):
        """Logits [B, T, V]; with a boolean ``mask`` [B, T], only at the masked positions
        ([n, V], row-major order)."""
        h = self.hidden(tokens)
        if mask is not None:
            h = h[mask]
        return self.head(h)

    @torch.no_grad()
    def state_bytes(self, tokens) -> int:
        """Bytes of everything the model must keep to continue after ``tokens`` [1, T]:
        each mixer's streaming state (recurrent state, raw and fading windows, store, or KV
        cache) plus the convolutions' last K-1 inputs, at float32."""
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(f"state_bytes: tokens must be [1, T], got {tuple(tokens.shape)}")
        _, sizes = model_args.run_blocks(self, self.embed[tokens], _norm, _conv, _state_bytes)
        return int(sum(sizes) + model_args.conv_state_bytes(self))
