"""Numerics and parameter plumbing shared by the torch backend's layers.

The formulas match ``memcore.spec.reference._xp`` exactly (same softplus, same L2 floor, same
norm epsilon), so the backend and the reference differ only by rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from memcore.spec.reference._xp import L2_EPS, NORM_EPS
from memcore.spec.reference.rope import ROPE_BASE
from torch import nn

NEG_INF = -math.inf


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(x, weight):
    return F.linear(x, weight)


def softplus(x):
    # The reference's formula: torch's softplus switches to x above a threshold.
    e = torch.log1p(torch.exp(-x.abs()))
    return torch.where(x > 0, x + e, e)


def l2_normalize(x):
    return F.normalize(x, dim=-1, eps=L2_EPS)


def rms_norm(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + NORM_EPS) * weight


def layer_norm(x, weight):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + NORM_EPS) * weight


def gelu(x):
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(E: int, dtype, device):
    """The rotation's frequencies [E // 2] (base 10000, rotate-half)."""
    half = E // 2
    return ROPE_BASE ** (-torch.arange(half, dtype=dtype, device=device) * (2.0 / (2 * half)))


def rope_tables(start: int, T: int, E: int, dtype, device):
    """(cos, sin) [1, T, 1, E // 2] of the rotation at positions start .. start+T-1, to share
    between the projections rotated at the same positions."""
    inv_freq = rope_inv_freq(E, dtype, device)
    pos = torch.arange(start, start + T, device=device).to(dtype)
    ang = pos[:, None] * inv_freq[None, :]
    return torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]


def rope(x, start: int, tables=None):
    """x: [B, T, H, E] at absolute positions start .. start+T-1 (rotate-half, base 10000;
    an odd last coordinate is left alone). ``tables``: ``rope_tables`` for these positions."""
    E = x.shape[-1]
    half = E // 2
    if half == 0:
        return x
    cos, sin = tables if tables is not None else rope_tables(start, x.shape[1], E, x.dtype,
                                                             x.device)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if E % 2:
        parts.append(x[..., 2 * half:])
    return torch.cat(parts, dim=-1)


def append_in_place(cache, entry):
    """``cat([cache, entry[:, :, None]], dim=2)`` for a cache [B, H, n, E] that grows by one
    entry [B, H, E] per token, amortised: the cache is the first n slots of a larger buffer
    that this function made, so an append writes one slot and returns a longer view of it; a
    full buffer (or any other tensor) is copied once into one with room to spare. Memory
    outside a tensor is only written when the buffer was made here, so a caller's slice of
    their own tensor is never written past its end."""
    B, H, n, E = cache.shape
    base = cache._base
    if (base is not None and getattr(base, "_memcore_growable", False) and n < base.shape[2]
            and cache.storage_offset() == base.storage_offset()
            and cache.stride() == base.stride() and base.shape[:2] == (B, H)
            and base.shape[3] == E):
        base[:, :, n] = entry
        return base[:, :, :n + 1]
    base = torch.empty(B, H, n + max(64, n // 2), E, dtype=cache.dtype, device=cache.device)
    base._memcore_growable = True
    base[:, :, :n] = cache
    base[:, :, n] = entry
    return base[:, :, :n + 1]


# --- parameters ------------------------------------------------------------------------------

class Holder(nn.Module):
    """A plain container: parameters and children only, so that dotted ``memcore.init`` names
    become nested module paths."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("a parameter holder has no forward")


def register_params(module: nn.Module, params: dict) -> None:
    """Register every ``name -> array`` of ``params`` on ``module`` under its dotted name."""
    for name, value in params.items():
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = Holder()
                owner.add_module(part, child)
            owner = child
        arr = value.detach().clone() if isinstance(value, torch.Tensor) else torch.from_numpy(
            np.array(value, copy=True))
        owner.register_parameter(leaf, nn.Parameter(arr))


def param_dict(module: nn.Module, dtype: torch.dtype) -> dict:
    """The module's parameters by dotted name, cast to the compute dtype (a no-op cast keeps
    the parameter itself on the graph)."""
    return {n: (p if p.dtype == dtype else p.to(dtype)) for n, p in module.named_parameters()}


def step_params(module: nn.Module, dtype: torch.dtype) -> dict:
    """``param_dict`` for per-token calls, without walking the module tree each token: kept
    while every parameter is the same object, with ``dtype`` (training updates parameters in
    place, and ``.to()`` swaps their data, so the kept tensors stay current); never kept when
    a cast is needed, as a cast copy would not follow the parameter."""
    kept = module.__dict__.get("_step_params")
    if kept is not None and kept[0] == dtype and all(
            owner._parameters.get(leaf) is p and p.dtype == dtype for owner, leaf, p in kept[1]):
        return kept[2]
    entries = [(m, leaf, p) for _, m in module.named_modules()
               for leaf, p in m._parameters.items() if p is not None]
    params = param_dict(module, dtype)
    if all(p.dtype == dtype for _, _, p in entries):
        module.__dict__["_step_params"] = (dtype, entries, params)
    return params


def sub(p: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def check_like_params(module: nn.Module, x, name: str) -> None:
    """x must sit on the parameters' device and have their dtype."""
    ref = next(module.parameters(), None)
    if ref is None:
        return
    if x.device != ref.device:
        raise ValueError(f"{name} is on device {x.device}, but the parameters are on "
                         f"{ref.device}; move one of them (module.to(device))")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, but the parameters have dtype "
                        f"{ref.dtype}; cast one of them (e.g. module.to({x.dtype}))")
