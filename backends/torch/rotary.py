"""Rotary position embedding (rotate-half, base ``ROPE_BASE``; an odd last coordinate is left
alone), with the tables shared between the projections rotated at the same positions."""

from __future__ import annotations

import torch
from memcore.spec.constants import ROPE_BASE


def rope_inv_freq(E: int, dtype, device):
    """The rotation's frequencies [E // 2]."""
    half = E // 2
    return ROPE_BASE ** (-torch.arange(half, dtype=dtype, device=device) * (2.0 / (2 * half)))


def rope_tables(start: int, T: int, E: int, dtype, device):
    """(cos, sin) [1, T, 1, E // 2] of the rotation at positions start .. start+T-1."""
    inv_freq = rope_inv_freq(E, dtype, device)
    pos = torch.arange(start, start + T, device=device).to(dtype)
    ang = pos[:, None] * inv_freq[None, :]
    return torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]


_INV_FREQ = {}


def step_tables(pos: int, E: int, dtype, device):
    """``rope_tables(pos, 1, E, ...)``, with the frequencies made once per width, dtype and
    device (the angle is the same product; a position below 2^24 is exact in float32)."""
    key = (E, dtype, device)
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        inv_freq = _INV_FREQ[key] = rope_inv_freq(E, dtype, device)
    ang = (inv_freq * float(pos))[None, None, None, :]
    return torch.cos(ang), torch.sin(ang)


def rope(x, start: int, tables=None):
    """x: [B, T, H, E] at absolute positions start .. start+T-1. ``tables``: ``rope_tables``
    for these positions."""
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
