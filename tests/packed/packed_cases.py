"""Shared pieces of the packed-sequence tests (DESIGN 5a): document boundaries drawn by
hypothesis, and the property itself: a packed forward equals the separate forwards of its
documents, concatenated, and returns the last document's state.

``ERRORS`` keeps the largest packed-vs-separate relative error seen per (tree, realization),
so a run can report it (see tests/packed/report.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from refcheck import assert_close, assert_states_equal, rel_err, to_numpy

ERRORS: dict = {}


# Drawn first (hypothesis starts from the simplest example, a one-token row): many documents,
# length-1 ones together and at both ends, boundaries inside chunks of 2 .. 4 and windows.
AWKWARD = ([1, 5, 1, 1, 7, 2, 1], [6, 1, 9])


@st.composite
def doc_lengths(draw, max_docs: int = 5, max_len: int = 9):
    """Lengths of 1 .. max_docs documents, each 1 .. max_len tokens (length 1 often); the
    rows of ``AWKWARD`` among them."""
    if not draw(st.booleans()):  # False is hypothesis's first choice
        return list(draw(st.sampled_from(AWKWARD)))
    n = draw(st.integers(1, max_docs))
    return draw(st.lists(st.one_of(st.just(1), st.integers(1, max_len)), min_size=n,
                         max_size=n))


def cu_seqlens(lengths) -> np.ndarray:
    """int32 [N + 1]: 0, then the cumulative lengths."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def split(x, cu, axis: int = 1):
    """The documents of a packed array along ``axis``."""
    return [x[(slice(None),) * axis + (slice(int(a), int(b)),)]
            for a, b in zip(cu[:-1], cu[1:], strict=True)]


def concat(parts, axis: int = 1):
    return np.concatenate([to_numpy(p) for p in parts], axis=axis)


def record(tree: str, name: str, err: float) -> None:
    key = (tree, name)
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)


def check_packed(run, x, cu, tree: str, name: str, rtol: float, axis: int = 1) -> None:
    """``run(x, cu_seqlens)`` -> (y, state, aux) on a packed row equals ``run(doc, None)`` per
    document: y concatenated, the last document's state, and aux as the token-weighted mean
    of the documents' (a mean over the packed row's tokens)."""
    y, state, aux = run(x, cu)
    parts = [run(doc, None) for doc in split(x, cu, axis)]
    want = concat([p[0] for p in parts], axis)
    err = rel_err(y, want)
    record(tree, name, err)
    assert_close(y, want, f"{name}: packed vs separate", rtol)
    assert_states_equal(state, parts[-1][1], f"{name}: final state", rtol)
    if aux is not None or parts[-1][2] is not None:
        lengths = np.diff(cu)
        total = sum(float(to_numpy(p[2])) * n for p, n in zip(parts, lengths, strict=True))
        mean = total / lengths.sum()
        assert abs(float(to_numpy(aux)) - mean) <= rtol * max(1.0, abs(mean)), (
            f"{name}: aux {float(to_numpy(aux))} != token-weighted mean {mean}")


# cu_seqlens every tree refuses for a row of T=6 tokens, with words the error must hold
BAD_CU_SEQLENS = {
    "int64": (np.array([0, 2, 6], np.int64), "int32"),
    "float": (np.array([0.0, 2.0, 6.0], np.float32), "int32"),
    "2-D": (np.array([[0, 2, 6]], np.int32), "1-D"),
    "one entry": (np.array([0], np.int32), "1-D"),
    "start": (np.array([1, 2, 6], np.int32), "start at 0"),
    "end": (np.array([0, 2, 5], np.int32), "end at"),
    "decreasing": (np.array([0, 4, 2, 6], np.int32), "strictly increasing"),
    "empty document": (np.array([0, 2, 2, 6], np.int32), "strictly increasing"),
    "list": ([0, 2, 6], "int32 array"),
}


def reset_of(cu, T: int):
    """A kernel's ``reset`` for boundaries ``cu``: bool [T], True at each document's first
    token (a torch tensor)."""
    import torch

    r = torch.zeros(T, dtype=torch.bool)
    r[torch.as_tensor(cu[:-1], dtype=torch.long)] = True
    return r


def spy_calls(monkeypatch, module, name: str, keyword: str) -> list:
    """Wraps ``module.name`` for the test: the list returned records, per call, whether
    ``keyword`` was passed (say, a kernel's boundaries)."""
    calls = []
    real = getattr(module, name)

    def spy(*a, **kw):
        calls.append(kw.get(keyword) is not None)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


def check_packed_torch_layer(spec, tree: str, name: str, rtol: float) -> None:
    """The torch layer of ``spec`` on one packed row of four documents equals its separate
    forwards (``check_packed``), as ``MEMCORE_KERNELS`` has it run."""
    import torch
    from refcheck import inputs, params64

    import memcore

    layer = memcore.realize(spec, backend="torch", params=params64(spec))
    cu = cu_seqlens([4, 1, 6, 3])
    x = torch.from_numpy(inputs(spec, 1, int(cu[-1]), seed=2))

    def run(a, cu_):
        return layer.forward_aux(a, None, cu_seqlens=None if cu_ is None else
                                 torch.from_numpy(cu_))

    check_packed(run, x, cu, tree, name, rtol)
