"""Rotary position embedding at absolute positions (rotate-half layout, base ROPE_BASE or a
layer's ``rope_theta``).

With an odd head width E the last coordinate is left unrotated; the first 2 * (E // 2) are
rotated in pairs (i, i + E // 2).

The angle of pair i at position p is p * ROPE_BASE^(-i / half). It is computed in float64
whatever the input dtype, and only its cos and sin are cast: a float32 angle rounds p * f to
2^-24 of its size, which is an error of whole radians at p ~ 2^24 (DESIGN 6, long streams).
``frequencies`` is the one definition of the frequencies, which the backends share.
"""

from __future__ import annotations

import functools

import numpy as np

from ..constants import ROPE_BASE
from .numerics import device


@functools.lru_cache(maxsize=64)
def _frequencies(half: int, base: float) -> np.ndarray:
    return base ** (-np.arange(half, dtype=np.float64) * (2.0 / (2 * half)))


def frequencies(half: int, base: float = ROPE_BASE) -> np.ndarray:
    """The rotation's frequencies base^(-i / half), i < half (base: ROPE_BASE, or a layer's
    ``rope_theta``), as a float64 numpy array (a copy: the cached one stays as it is)."""
    if isinstance(half, bool) or not isinstance(half, int) or half < 1:
        raise ValueError(f"frequencies: half must be a positive int, got {half!r}")
    return _frequencies(half, float(base)).copy()


def _holds_float64(xp, dev) -> bool:
    try:
        return "float64" in xp.__array_namespace_info__().dtypes(device=dev,
                                                                 kind="real floating")
    except (AttributeError, TypeError, ValueError):  # a namespace without the inspection API
        return True


def rotary_tables(xp, positions, half: int, dtype, like, base: float = ROPE_BASE):
    """cos and sin of the angles p * ROPE_BASE^(-i / half), each [T, half] in ``dtype``, for
    integer positions [T]. The angles are float64: on ``like``'s device where its library
    holds float64 there, else (JAX without x64) on the host, from concrete positions."""
    dev = device(like)
    if _holds_float64(xp, dev):
        inv_freq = xp.asarray(frequencies(half, base), dtype=xp.float64, device=dev)
        ang = xp.astype(positions, xp.float64)[:, None] * inv_freq[None, :]
        return xp.astype(xp.cos(ang), dtype), xp.astype(xp.sin(ang), dtype)
    try:
        pos = np.asarray(positions)
    except (TypeError, RuntimeError, ValueError) as e:  # e.g. traced: nothing to read here
        raise TypeError(f"rotary_tables: {type(positions).__name__} positions hold no float64 "
                        f"here and cannot be read on the host for float64 angles ({e}); run the "
                        f"reference with float64 enabled (JAX: jax_enable_x64)") from e
    ang = pos.astype(np.float64)[:, None] * frequencies(half, base)[None, :]
    return (xp.asarray(np.cos(ang), dtype=dtype, device=dev),
            xp.asarray(np.sin(ang), dtype=dtype, device=dev))


def rope(xp, x, positions, base: float = ROPE_BASE):
    """x: [B, T, H, E]; positions: [T] absolute positions (ints). Returns x rotated."""
    E = x.shape[-1]
    half = E // 2
    if half == 0:
        return x
    cos, sin = rotary_tables(xp, positions, half, x.dtype, x, base)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1 = x[..., :half]
    x2 = x[..., half:2 * half]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if E % 2:
        parts.append(x[..., 2 * half:])
    return xp.concat(parts, axis=-1)
