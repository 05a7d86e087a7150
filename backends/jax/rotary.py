"""Rotary position embedding (rotate-half), as ``memcore.spec.reference.rotary``."""

from __future__ import annotations

import jax.numpy as jnp
from memcore.spec.constants import ROPE_BASE


def rope(x, pos):
    """x: [B, T, H, E] rotated at absolute positions ``pos`` [T] (base ROPE_BASE; an odd width
    leaves its last coordinate alone)."""
    E = x.shape[-1]
    half = E // 2
    if half == 0:
        return x
    inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=x.dtype) * (2.0 / (2 * half)))
    ang = pos.astype(x.dtype)[:, None] * inv_freq[None, :]
    cos = jnp.cos(ang)[None, :, None, :]
    sin = jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if E % 2:
        parts.append(x[..., 2 * half:])
    return jnp.concatenate(parts, axis=-1)
