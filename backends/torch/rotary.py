"""Rotary position embedding (rotate-half, base ``ROPE_BASE``; an odd last coordinate is left
alone), with the tables shared between the projections rotated at the same positions.

The angles p * f are float64 (positions are Python ints here), and only their cos and sin are
cast to the compute dtype: a float32 angle is off by whole radians at p ~ 2^24 (DESIGN 6). A
device without float64 (MPS) has its tables made on the CPU and moved.
"""

from __future__ import annotations

import torch
from memcore.spec.constants import ROPE_BASE
from memcore.spec.reference.rotary import frequencies

_INV_FREQ = {}


def _angle_device(device) -> torch.device:
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def rope_inv_freq(E: int, device, base: float = ROPE_BASE):
    """The rotation's frequencies [E // 2], float64 on ``device`` (made once per width, base
    and device: the streaming step asks for them at every token)."""
    key = (E, device, float(base))
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        inv_freq = _INV_FREQ[key] = torch.from_numpy(frequencies(E // 2, base)).to(device)
    return inv_freq


def _tables(ang, dtype, device):
    """cos and sin of the float64 angles, cast (and moved) only then."""
    return (torch.cos(ang).to(device=device, dtype=dtype),
            torch.sin(ang).to(device=device, dtype=dtype))


def rope_tables(start: int, T: int, E: int, dtype, device, base: float = ROPE_BASE):
    """(cos, sin) [1, T, 1, E // 2] in ``dtype`` of the rotation at positions
    start .. start+T-1."""
    dev = _angle_device(device)
    pos = torch.arange(start, start + T, device=dev, dtype=torch.float64)
    cos, sin = _tables(pos[:, None] * rope_inv_freq(E, dev, base)[None, :], dtype, device)
    return cos[None, :, None, :], sin[None, :, None, :]


def step_tables(pos: int, E: int, dtype, device, base: float = ROPE_BASE):
    """``rope_tables(pos, 1, E, ...)`` for one token: the same float64 product."""
    dev = _angle_device(device)
    cos, sin = _tables(rope_inv_freq(E, dev, base) * float(pos), dtype, device)
    return cos[None, None, None, :], sin[None, None, None, :]


def rope(x, start: int, tables=None, base: float = ROPE_BASE):
    """x: [B, T, H, E] at absolute positions start .. start+T-1. ``tables``: ``rope_tables``
    for these positions."""
    E = x.shape[-1]
    half = E // 2
    if half == 0:
        return x
    cos, sin = tables if tables is not None else rope_tables(start, x.shape[1], E, x.dtype,
                                                             x.device, base)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if E % 2:
        parts.append(x[..., 2 * half:])
    return torch.cat(parts, dim=-1)
