"""Rotary position embedding (rotate-half), as ``memcore.spec.reference.rotary``.

Positions are traced int32 arrays here, and float64 may be switched off (jax_enable_x64), so
the angle p * f of a float32 or lower-precision call is reduced exactly in integer arithmetic
before any rounding: each frequency is held as a 64-bit fixed-point fraction of a turn, and
p * f mod 1 turn comes out of wrapping uint32 products as a 32-bit fraction of a turn. Only
that reduced angle, in [-pi, pi), is rounded to float32, so its error is float32 epsilon of
the reduced angle whatever p is (a float32 product p * f is off by whole radians at p ~ 2^24,
DESIGN 6). A float64 call takes the float64 product, as the reference does.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from memcore.spec.constants import ROPE_BASE
from memcore.spec.reference.rotary import frequencies

# 2*pi to 50 digits: the fixed-point frequencies are rounded once from the exact quotient
_TWO_PI = Fraction("6.28318530717958647692528676655900576839433879875021")
_LOW16 = 0xFFFF


@functools.lru_cache(maxsize=64)
def _turn_fractions(half: int, base: float = ROPE_BASE):
    """(high, low) uint32 words [half] of round(f_i / (2*pi) * 2^64), f_i the float64
    frequencies."""
    words = [round(Fraction(float(f)) / _TWO_PI * 2**64) for f in frequencies(half, base)]
    high = np.array([w >> 32 for w in words], dtype=np.uint32)
    low = np.array([w & 0xFFFFFFFF for w in words], dtype=np.uint32)
    return high, low


def reduced_turns(pos, half: int, base: float = ROPE_BASE):
    """int32 [T, half]: u with p * f_i = 2*pi * u / 2^32 (mod 2*pi), for positions ``pos``
    [T] (ints in [0, 2^31)), rounded to the nearest 2^-32 of a turn."""
    high, low = (jnp.asarray(w) for w in _turn_fractions(half, float(base)))
    p = pos.astype(jnp.uint32)[:, None]
    # p * (high * 2^32 + low) / 2^32 mod 2^32 = p * high + mulhi(p, low), with the 64-bit
    # product p * low built from 16-bit halves so that every partial product is exact
    ph, pl = p >> 16, p & _LOW16
    lh, ll = low >> 16, low & _LOW16
    a, b, c = pl * ll, pl * lh, ph * ll
    mid = (a >> 16) + (b & _LOW16) + (c & _LOW16)
    top = ph * lh + (b >> 16) + (c >> 16) + (mid >> 16)
    u = p * high + top + ((mid >> 15) & 1)  # wraps mod 2^32: whole turns drop out
    return jax.lax.bitcast_convert_type(u, jnp.int32)  # [-2^31, 2^31): turns in [-1/2, 1/2)


def rotary_tables(pos, half: int, dtype, base: float = ROPE_BASE):
    """cos and sin [T, half] in ``dtype`` of the angles p * f_i at positions ``pos`` [T]."""
    if jnp.dtype(dtype) == jnp.float64:
        ang = pos.astype(jnp.float64)[:, None] * jnp.asarray(frequencies(half, base))[None, :]
    else:
        scale = np.float32(2 * math.pi / 2**32)
        ang = reduced_turns(pos, half, base).astype(jnp.float32) * scale
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def rope(x, pos, base: float = ROPE_BASE):
    """x: [B, T, H, E] rotated at absolute positions ``pos`` [T] (``base``: ROPE_BASE or a
    layer's rope_theta; an odd width leaves its last coordinate alone)."""
    E = x.shape[-1]
    half = E // 2
    if half == 0:
        return x
    cos, sin = rotary_tables(pos, half, x.dtype, base)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if E % 2:
        parts.append(x[..., 2 * half:])
    return jnp.concatenate(parts, axis=-1)
