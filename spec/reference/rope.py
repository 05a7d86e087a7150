"""Rotary position embedding at absolute positions (rotate-half layout, base 10000).

With an odd head width E the last coordinate is left unrotated; the first 2 * (E // 2) are
rotated in pairs (i, i + E // 2).
"""

from __future__ import annotations

from ._xp import device

ROPE_BASE = 10000.0


def rope(xp, x, positions):
    """x: [B, T, H, E]; positions: [T] absolute positions (ints). Returns x rotated."""
    E = x.shape[-1]
    half = E // 2
    if half == 0:
        return x
    dev = device(x)
    inv_freq = ROPE_BASE ** (-xp.arange(half, dtype=x.dtype, device=dev) * (2.0 / (2 * half)))
    pos = xp.astype(positions, x.dtype)
    ang = pos[:, None] * inv_freq[None, :]  # [T, half]
    cos = xp.cos(ang)[None, :, None, :]
    sin = xp.sin(ang)[None, :, None, :]
    x1 = x[..., :half]
    x2 = x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if E % 2:
        parts.append(x[..., 2 * half:])
    return xp.concat(parts, axis=-1)
