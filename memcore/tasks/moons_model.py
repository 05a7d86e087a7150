"""The three-moons model of Memory Mosaics (``ThreeMoons/model.py``): one contextual memory
layer without embedding, with complex 3x3 maps for keys (W_phi x_t), values (W_psi x_{t+1}) and
output, initialised as the official ``ComplexLinear``; logits scaled by ``BETA``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import memcore.ops

BETA = 50.0


def complex_init(a: int, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(re, im) [b, a] of a complex map C^a -> C^b initialised as the official ``ComplexLinear``:
    a real [2b, 2a] matrix U(+-1/sqrt(2a)), projected onto the complex-linear matrices (each 2x2
    block [[p, q], [r, s]] becomes re = (p + s) / 2, im = (r - q) / 2). Each entry is the mean of
    two uniforms: std 1/sqrt(12 a), 1/sqrt 2 of the unprojected draw's."""
    w = (torch.rand(2 * b, 2 * a, generator=gen) * 2 - 1) / math.sqrt(2 * a)
    return (w[0::2, 0::2] + w[1::2, 1::2]) / 2, (w[1::2, 0::2] - w[0::2, 1::2]) / 2


MAPS = ("phi", "psi", "out")


def initial_weights(seed: int) -> dict:
    """The initial (re, im) of W_phi, W_psi and W_out for ``seed`` (numpy, by parameter name):
    both backends' models start from these."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in MAPS:
        re, im = complex_init(3, 3, gen)
        out[f"{m}.re"], out[f"{m}.im"] = re.numpy(), im.numpy()
    return out


class ComplexLinear(nn.Module):
    """A map C^a -> C^b acting on R^2a as (re, im) pairs: a real matrix constrained to be
    complex, from its (re, im) [b, a]."""

    def __init__(self, re, im):
        super().__init__()
        self.re = nn.Parameter(torch.as_tensor(re, dtype=torch.float32).clone())
        self.im = nn.Parameter(torch.as_tensor(im, dtype=torch.float32).clone())

    def forward(self, x):
        xr, xi = x[..., 0::2], x[..., 1::2]
        yr = xr @ self.re.T - xi @ self.im.T
        yi = xr @ self.im.T + xi @ self.re.T
        return torch.stack([yr, yi], dim=-1).flatten(-2)


class MoonsMemory(nn.Module):
    """One contextual memory layer on x [B, T, 6]: predicts x_{t+1} at every t."""

    def __init__(self, heads: int, seed: int = 0):
        super().__init__()
        if heads not in (1, 3):
            raise ValueError(f"moons: heads must be 1 or 3 (3 complex dims in all), got {heads}")
        w = initial_weights(seed)
        self.heads = heads
        self.phi, self.psi, self.out = (ComplexLinear(w[f"{m}.re"], w[f"{m}.im"]) for m in MAPS)

    def key(self, x):
        """k = W_phi x per head [..., H, E], scaled so that k.k' carries beta."""
        return self.phi(x).unflatten(-1, (self.heads, 6 // self.heads)) * math.sqrt(BETA)

    def value(self, x_next):
        """The value of a pair whose successor is ``x_next``: W_psi x_next per head."""
        return self.psi(x_next).unflatten(-1, (self.heads, 6 // self.heads))

    def forward(self, x):
        B, T, _ = x.shape
        # v_j = W_psi x_{j+1}: the last position has no successor and is never read (j < t).
        v = self.value(torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1))
        y = memcore.ops.associative_readout(self.key(x), v)
        return self.out(y.reshape(B, T, 6))


def memory_model(backend: str, heads: int, seed: int):
    """``MoonsMemory`` (torch) or its twin ``jax_stack.JaxMoonsMemory``."""
    if backend == "jax":
        from memcore.tasks.jax_stack import JaxMoonsMemory

        return JaxMoonsMemory(heads, seed, beta=BETA)
    return MoonsMemory(heads, seed)


def torch_twin(model) -> MoonsMemory:
    """The torch ``MoonsMemory`` holding a model's parameters (a JAX twin's, or itself)."""
    if isinstance(model, MoonsMemory):
        return model
    twin = MoonsMemory(model.heads)
    twin.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in
                          model.state_dict().items()})
    return twin
