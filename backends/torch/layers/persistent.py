"""Memory Mosaics' persistent memory (DESIGN 2.6): leaky-average keys read out against learned
key/value slots; replaces the FFN. State: ``kbar``, plus ``pos``."""

from __future__ import annotations

import torch

from ..numerics import l2_normalize, linear
from ..persistent_readout import persistent_readout
from .mosaic import key_scale, leaky_key_step, leaky_keys


def init_state(spec, batch: int, *, dtype=torch.float32, device=None) -> dict:
    return {"pos": 0,
            "kbar": torch.zeros(batch, spec.n_heads, spec.head_dim, dtype=dtype, device=device)}


def _read(p, kbar):
    alpha = key_scale(p["k_scale"])[:, None]
    key = alpha * alpha * l2_normalize(kbar)  # [..., H, E]
    y = persistent_readout(key, p["mem_k"], p["mem_v"])
    return y * torch.exp(10.0 * p["out_scale"])[:, None]


def forward(spec, p, x, state, bounds=None):
    """``bounds``: a packed row's checked cu_seqlens: the leaky average restarts at every
    document; the state is the last document's."""
    B, T, D = x.shape
    kbar, kbar_T = leaky_keys(spec, p, x, state["kbar"], bounds)
    y = _read(p, kbar).reshape(B, T, D)
    n = T if bounds is None else T - bounds[-2]
    return linear(y, p["o_proj.weight"]), {"pos": state["pos"] + n, "kbar": kbar_T}, None


def step(spec, p, x_t, state, *, inplace: bool = False):
    kbar, kbar_state = leaky_key_step(spec, p, x_t, state["kbar"], inplace)
    y = _read(p, kbar).reshape(x_t.shape)
    return linear(y, p["o_proj.weight"]), {"pos": state["pos"] + 1, "kbar": kbar_state}, None
