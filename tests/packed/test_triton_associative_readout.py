"""Packed rows in the Triton associative readout, under TRITON_INTERPRET=1 on CPU: the kernel's
document masks (cu_seqlens) against the reference, forward and gradients, in float64, at tile
edges; a non-finite key or value stays in its document; bad boundaries are refused by name; the
torch backend takes the kernel for packed rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kcheck import assert_close as kernel_close  # noqa: E402
from memcore.backends.torch import implementation  # noqa: E402
from refcheck import assert_close  # noqa: E402

from tests.packed.packed_cases import cu_seqlens, doc_lengths, spy_calls  # noqa: E402

RTOL = 1e-9  # DESIGN 6: kernels in float64 (the gradients: kcheck's relative RMSE)
EXAMPLES = settings(max_examples=3, deadline=None)


# --- the associative readout's document masks (cu_seqlens) in the Triton kernel, and through
# the torch backend

import memcore.kernels.triton.associative_readout as assoc_mod  # noqa: E402
from memcore.backends.torch import associative_readout as t_assoc  # noqa: E402
from memcore.spec.reference.associative_readout import (  # noqa: E402
    associative_readout as ref_assoc,
)


def assoc_args(T, H, E, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, H, E, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(2)]


def check_assoc(y, k, v, cu, capacity, seed):
    """The kernel's y on (k, v) against the reference, forward and gradients, and against the
    torch path's packed form; at each document's first token both read 0 and pass no
    gradient back, exactly."""
    cu_t = torch.from_numpy(cu)
    want = ref_assoc(k, v, capacity, cu_seqlens=cu)
    assert_close(y, want, "y", RTOL)
    plain = assoc_mod.associative_readout_ref(k, v, capacity, cu_seqlens=cu_t)
    assert_close(plain, want, "plain torch in the kernel's module", RTOL)
    on_torch = t_assoc.associative_readout(k, v, capacity, cu_t, implementation="torch")
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad((y * w).sum(), (k, v), retain_graph=True)
    for what, out in (("reference", want), ("torch path", on_torch)):
        ref = torch.autograd.grad((out * w).sum(), (k, v), retain_graph=True)
        for name, a, b in zip(("k", "v"), got, ref, strict=True):
            kernel_close(f"{what}: d/d{name}", a, b, torch.float64)
    starts = torch.as_tensor(cu[:-1], dtype=torch.long)
    assert torch.equal(y[0, starts], torch.zeros_like(y[0, starts]))
    assert torch.equal(on_torch[0, starts], y[0, starts])
    w0 = torch.zeros_like(w)
    w0[0, starts] = w[0, starts]  # a cotangent on the first tokens only
    for what, out in (("kernel", y), ("torch path", on_torch)):
        for name, gr in zip(("k", "v"), torch.autograd.grad((out * w0).sum(), (k, v),
                                                            retain_graph=True), strict=True):
            assert torch.equal(gr, torch.zeros_like(gr)), f"{what}: d/d{name} from first tokens"


@EXAMPLES
@given(doc_lengths(max_docs=5, max_len=20), st.one_of(st.none(), st.integers(1, 4)),
       st.integers(0, 99))
def test_associative_readout_kernel(lengths, capacity, seed):
    cu = cu_seqlens(lengths)
    k, v = assoc_args(int(cu[-1]), 2, 3, seed)
    y = assoc_mod.associative_readout(k, v, capacity, cu_seqlens=torch.from_numpy(cu))
    check_assoc(y, k, v, cu, capacity, seed)


# Under the interpreter the tiles hold 16 rows: documents ending on a tile's edge, starting
# inside one, a lone token before a document across two tiles, a band crossing a boundary.
ASSOC_TILES = [([16, 16, 3], None), ([1, 33], 2), ([17, 1, 20], None), ([5, 30, 2], 3),
               ([2, 1, 1, 29, 1], 20)]


@pytest.mark.parametrize("case", ASSOC_TILES, ids=lambda c: "-".join(map(str, c[0])) +
                         f"_M{c[1]}")
def test_associative_readout_kernel_across_tiles(case):
    lengths, capacity = case
    cu = cu_seqlens(lengths)
    k, v = assoc_args(int(cu[-1]), 1, 5, 7)
    y = assoc_mod.associative_readout(k, v, capacity, cu_seqlens=torch.from_numpy(cu))
    check_assoc(y, k, v, cu, capacity, 8)


@pytest.mark.parametrize("which", ["k", "v"])
def test_associative_readout_kernel_keeps_a_non_finite_value_in_its_document(which):
    cu = torch.from_numpy(cu_seqlens([5, 6, 7]))
    T = 18
    keep = np.r_[0:8, 11:18]  # documents 0 and 2, and document 1 before the NaN
    k, v = (a.detach() for a in assoc_args(T, 2, 3, 0))
    clean = assoc_mod.associative_readout(k, v, cu_seqlens=cu)
    bad = {"k": k.clone(), "v": v.clone()}
    bad[which][0, 8, 1, 0] = math.nan  # head 1, position 3 of document 1
    y = assoc_mod.associative_readout(bad["k"], bad["v"], cu_seqlens=cu)
    assert torch.isfinite(y[0, keep]).all() and torch.isfinite(y[0, :, 0]).all()
    assert_close(y[0, keep], clean[0, keep], "other documents", RTOL)
    assert_close(y[0, :, 0], clean[0, :, 0], "the other head", RTOL)
    # a NaN key is a NaN query at 8 too; a NaN value is read only from 9 on
    first = 8 if which == "k" else 9
    assert torch.isnan(y[0, first:11, 1]).all()
    if which == "v":
        assert_close(y[0, 8], clean[0, 8], "the NaN's own position", RTOL)


BAD_ASSOC_CU = {
    "int64": (torch.tensor([0, 2, 6]), "int32 tensor"),
    "list": ([0, 2, 6], "int32 tensor"),
    "2-D": (torch.tensor([[0, 2, 6]], dtype=torch.int32), "1-D"),
    "one entry": (torch.tensor([0], dtype=torch.int32), "1-D"),
    "start": (torch.tensor([1, 2, 6], dtype=torch.int32), "start at 0"),
    "end": (torch.tensor([0, 2, 5], dtype=torch.int32), "end at T=6"),
    "empty document": (torch.tensor([0, 2, 2, 6], dtype=torch.int32), "strictly increasing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ASSOC_CU))
def test_associative_readout_kernel_refuses_bad_cu_seqlens(case):
    cu, words = BAD_ASSOC_CU[case]
    k, v = assoc_args(6, 1, 2, 0)
    with pytest.raises(ValueError, match=f"associative_readout: cu_seqlens.*{words}"):
        assoc_mod.associative_readout(k, v, cu_seqlens=cu)


def test_associative_readout_kernel_refuses_cu_seqlens_over_a_batch():
    k = torch.randn(2, 6, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="associative_readout: cu_seqlens.*batch 1"):
        assoc_mod.associative_readout(k, k, cu_seqlens=torch.tensor([0, 2, 6],
                                                                    dtype=torch.int32))


@pytest.mark.parametrize("how", ["explicit", "env"])
@pytest.mark.parametrize("capacity", [None, 3])
def test_backend_packed_associative_readout_on_the_kernel(how, capacity, monkeypatch):
    calls = spy_calls(monkeypatch, assoc_mod, "associative_readout", "cu_seqlens")
    if how == "env":
        monkeypatch.setenv(implementation.ENV, "triton")
    cu = cu_seqlens([1, 5, 1, 1, 7, 2, 1])
    k, v = assoc_args(int(cu[-1]), 2, 4, 5)
    y = t_assoc.associative_readout(k, v, capacity, torch.from_numpy(cu),
                                    implementation="triton" if how == "explicit" else "auto")
    assert calls == [True]  # the kernel ran, with the documents' boundaries
    check_assoc(y, k, v, cu, capacity, 6)
