"""Shared checks of the non-finite causality properties (DESIGN section 6): a NaN or an infinity
at position t changes no output before t, and the streaming and split forms equal the parallel
form wherever either is finite. Every tree's ``test_<tree>_nonfinite.py`` uses these."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

PREFIX_RTOL = 1e-12  # outputs before the poisoned position against the clean run (float64)
POISONS = st.sampled_from([math.nan, math.inf, -math.inf])


def to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu()
    return np.asarray(a)


def poison(arrays: dict, name: str, index: tuple, value) -> dict:
    """A copy of ``arrays`` with ``arrays[name][index] = value`` (numpy or torch arrays)."""
    out = dict(arrays)
    a = arrays[name]
    out[name] = a.clone() if hasattr(a, "clone") else a.copy()
    out[name][index] = value
    return out


def assert_prefix_clean(got, clean, t: int, axis: int, what: str) -> None:
    """Along ``axis``, the entries before t are finite and equal to the clean run's."""
    g = np.take(to_numpy(got), np.arange(t), axis=axis)
    c = np.take(to_numpy(clean), np.arange(t), axis=axis)
    bad = np.argwhere(~np.isfinite(g))
    assert bad.size == 0, f"{what}: non-finite before the poisoned position {t} at {bad[:4]}"
    if g.size:
        diff, scale = float(np.max(np.abs(g - c))), float(np.max(np.abs(c)))
        assert diff <= PREFIX_RTOL * scale or diff == 0.0, (
            f"{what}: before position {t} the output moved by {diff:.3e} (scale {scale:.3e})")


def assert_same_where_finite(got, want, what: str, *, rtol: float) -> None:
    """Non-finite at the same places; equal (relative to the finite entries' scale) elsewhere."""
    g, w = to_numpy(got), to_numpy(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    if not np.issubdtype(w.dtype, np.floating):
        assert np.array_equal(g, w), f"{what}: integer arrays differ:\n{g}\n{w}"
        return
    fg, fw = np.isfinite(g), np.isfinite(w)
    only = np.argwhere(fg != fw)
    assert only.size == 0, (f"{what}: finite in one form and not the other at {only[:4]} "
                            f"({int(np.sum(fg != fw))} entries)")
    if fw.any():
        diff, scale = float(np.max(np.abs(g[fw] - w[fw]))), float(np.max(np.abs(w[fw])))
        assert diff <= rtol * scale or diff == 0.0, (
            f"{what}: relative error {diff / max(scale, 1e-300):.3e} > {rtol:.0e} where finite")


def assert_states_match(got, want, what: str = "state", *, rtol: float) -> None:
    """``assert_same_where_finite`` over a state's nested dicts, tuples and arrays."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{what}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_states_match(got[k], want[k], f"{what}[{k!r}]", rtol=rtol)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), f"{what}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_states_match(g, w, f"{what}[{i}]", rtol=rtol)
    elif isinstance(want, (int, str)):
        assert got == want, f"{what}: {got!r} != {want!r}"
    else:
        assert_same_where_finite(got, want, what, rtol=rtol)
