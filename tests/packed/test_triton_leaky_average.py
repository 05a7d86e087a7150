"""Packed rows in the Triton leaky average, under TRITON_INTERPRET=1 on CPU: the kernel's restarts
(reset) against the reference, forward and gradients, in float64; a non-finite token stays in
its document; the torch backend and the mosaic layers on the kernels equal the separate
forwards."""

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

import memcore  # noqa: E402
from tests.packed.packed_cases import (  # noqa: E402
    check_packed_torch_layer,
    cu_seqlens,
    doc_lengths,
    reset_of,
    spy_calls,
)

RTOL = 1e-9  # DESIGN 6: kernels in float64 (the gradients: kcheck's relative RMSE)
EXAMPLES = settings(max_examples=3, deadline=None)


# --- the leaky average's restarts (reset) in the Triton kernel, and through the torch backend

import memcore.kernels.triton.associative_readout as assoc_mod  # noqa: E402
import memcore.kernels.triton.leaky_average as leaky_mod  # noqa: E402
from memcore.backends.torch import leaky_average as t_leaky  # noqa: E402
from memcore.spec.reference.leaky_average import leaky_average as ref_leaky  # noqa: E402


def leaky_args(Bt, T, H, E, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(Bt, T, H, E, generator=g, dtype=torch.float64).requires_grad_()
    # Memory Mosaics' decay -10|p|: a strong and a weak head
    ld = (-10 * torch.linspace(0.01, 0.3, H, dtype=torch.float64)).requires_grad_()
    return k, ld


@EXAMPLES
@given(doc_lengths(max_docs=6, max_len=11), st.sampled_from([2, 4, 8]), st.integers(0, 99))
def test_leaky_average_kernel(lengths, chunk, seed):
    cu = cu_seqlens(lengths)
    T = int(cu[-1])
    # two batch rows share the restarts; E = 35 spans two programs of the width
    k, ld = leaky_args(2, T, 2, 35, seed)
    y, h = leaky_mod.leaky_average(k, ld, return_final_state=True, chunk=chunk,
                                   reset=reset_of(cu, T))
    g = torch.Generator().manual_seed(seed + 1)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    wh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), (k, ld))
    for b in range(2):
        yr, hr = ref_leaky(k[b:b + 1], ld, return_final_state=True, cu_seqlens=cu)
        assert_close(y[b:b + 1], yr, f"row {b}: kbar", RTOL)
        assert_close(h[b:b + 1], hr, f"row {b}: final state", RTOL)
        loop = leaky_mod.leaky_average_ref(k[b:b + 1], ld, return_final_state=True,
                                           reset=reset_of(cu, T))
        assert_close(loop[0], yr, f"row {b}: plain loop, kbar", RTOL)
        assert_close(loop[1], hr, f"row {b}: plain loop, final state", RTOL)
    yr, hr = zip(*(ref_leaky(k[b:b + 1], ld, return_final_state=True, cu_seqlens=cu)
                   for b in range(2)), strict=True)
    want = torch.autograd.grad((torch.cat(yr) * wy).sum() + (torch.cat(hr) * wh).sum(), (k, ld))
    for name, a, b in zip(("k", "log_decay"), got, want, strict=True):
        kernel_close(f"d/d{name}", a, b, torch.float64)


BAD_RESETS = {
    "length": torch.ones(5, dtype=torch.bool),
    "2-D": torch.ones(1, 6, dtype=torch.bool),
    "dtype": torch.ones(6, dtype=torch.int32),
    "device": torch.ones(6, dtype=torch.bool, device="meta"),
}


@pytest.mark.parametrize("case", sorted(BAD_RESETS))
def test_leaky_average_kernel_refuses_a_bad_reset(case):
    k, ld = leaky_args(1, 6, 2, 3, 0)
    with pytest.raises(ValueError, match=r"reset must be bool \[T=6\] on cpu"):
        leaky_mod.leaky_average(k, ld, reset=BAD_RESETS[case])


@pytest.mark.parametrize("chunk", [4, 8])
def test_leaky_average_kernel_keeps_a_non_finite_value_in_its_document(chunk):
    # documents 0:5, 5:12, 12:18, the NaN at 8: with chunk 4 the last document starts a chunk,
    # so the NaN reaches it as the saved state entering that chunk
    cu = cu_seqlens([5, 7, 6])
    T = 18
    keep = np.r_[0:8, 12:18]
    k, ld = leaky_args(1, T, 2, 3, 0)
    k = k.detach()
    bad = k.clone()
    bad[0, 8, 1] = math.nan
    out = {}
    for name, x in (("clean", k), ("bad", bad)):
        x = x.clone().requires_grad_()
        y, h = leaky_mod.leaky_average(x, ld, return_final_state=True, chunk=chunk,
                                       reset=reset_of(cu, T))
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out[name] = (y.detach(), h.detach(), torch.autograd.grad((y * w).sum() + h.sum(), x)[0])
    (y0, h0, dk0), (y, h, dk) = out["clean"], out["bad"]
    assert torch.isfinite(y[0, keep]).all() and torch.isfinite(h).all()
    assert_close(y[0, keep], y0[0, keep], "kbar: other documents", RTOL)
    assert_close(h, h0, "final state (the last document's)", RTOL)
    assert torch.isnan(y[0, 8:12, 1]).all()
    # dk = the adjoint, which no restart lets across: the other documents' are unchanged
    assert_close(dk[0, keep], dk0[0, keep], "dk: other documents", RTOL)


def test_backend_packed_leaky_average_on_the_kernel(monkeypatch):
    calls = spy_calls(monkeypatch, leaky_mod, "leaky_average", "reset")
    cu = cu_seqlens([1, 5, 1, 1, 7, 2, 1])
    T = int(cu[-1])
    k, ld = leaky_args(1, T, 3, 4, 5)
    y, h = t_leaky.leaky_average(k, ld, return_final_state=True,
                                 cu_seqlens=torch.from_numpy(cu), implementation="triton")
    assert calls == [True]  # the kernel ran, with the documents' starts
    yr, hr = ref_leaky(k, ld, return_final_state=True, cu_seqlens=cu)
    assert_close(y, yr, "kbar", RTOL)
    assert_close(h, hr, "final state", RTOL)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad((y * w).sum() + h.sum(), (k, ld))
    want = torch.autograd.grad((yr * w).sum() + hr.sum(), (k, ld))
    for name, a, b in zip(("k", "log_decay"), got, want, strict=True):
        kernel_close(f"d/d{name}", a, b, torch.float64)


MOSAICS = {
    "mosaic_ring": memcore.spec.mosaic(4, 2, capacity=2),
    "mosaic_cache": memcore.spec.mosaic(4, 2),
}


@pytest.mark.parametrize("name", sorted(MOSAICS))
def test_mosaic_on_the_kernels(name, monkeypatch):
    monkeypatch.setenv(implementation.ENV, "triton")
    calls = spy_calls(monkeypatch, leaky_mod, "leaky_average", "reset")
    readouts = spy_calls(monkeypatch, assoc_mod, "associative_readout", "cu_seqlens")
    check_packed_torch_layer(MOSAICS[name], "triton", name, RTOL)
    assert True in calls  # the packed leaky average ran on the kernel, with its restarts
    assert False in calls  # and so did the separate documents', without
    assert True in readouts  # the packed readout ran on the kernel, with the boundaries
