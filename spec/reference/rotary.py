"""Rotary position embedding at absolute positions (rotate-half layout, base ROPE_BASE).

With an odd head width E the last coordinate is left unrotated; the first 2 * (E // 2) are
rotated in pairs (i, i + E // 2).
"""

from __future__ import annotations

from ..constants import ROPE_BASE
from .numerics import device


def rotary_tables(xp, positions, half: int, dtype, like):
    """cos and sin of the angles p * ROPE_BASE^(-i / half), each [T, half], for positions [T]."""
    i = xp.arange(half, dtype=dtype, device=device(like))
    inv_freq = ROPE_BASE ** (-i * (2.0 / (2 * half)))
    ang = xp.astype(positions, dtype)[:, None] * inv_freq[None, :]
    return xp.cos(ang), xp.sin(ang)


def rope(xp, x, positions):
    """x: [B, T, H, E]; positions: [T] absolute positions (ints). Returns x rotated."""
    E = x.shape[-1]
    half = E // 2
    if half == 0:
        return x
    cos, sin = rotary_tables(xp, positions, half, x.dtype, x)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1 = x[..., :half]
    x2 = x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if E % 2:
        parts.append(x[..., 2 * half:])
    return xp.concat(parts, axis=-1)
