"""Packed sequences in the Triton kernels (DESIGN 5a), under TRITON_INTERPRET=1 on CPU: the
selective scan's restarts and the windowed readout's document masks against the reference,
forward and gradients, in float64; the torch backend's packed layers with the kernels forced
on (MEMCORE_KERNELS=triton) equal the separate forwards; a non-finite token stays in its
document; mamba-ssm's kernel, which takes no boundaries, is refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.selective_scan as scan_kernel  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kcheck import assert_close as kernel_close  # noqa: E402
from memcore.backends.torch import implementation  # noqa: E402
from memcore.backends.torch import selective_scan as t_scan  # noqa: E402
from memcore.kernels.triton.selective_scan import selective_scan  # noqa: E402
from memcore.kernels.triton.windowed_readout import windowed_readout  # noqa: E402
from memcore.spec.reference.selective_scan import selective_scan as ref_scan  # noqa: E402
from memcore.spec.reference.windowed_readout import windowed_readout as ref_readout  # noqa: E402
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


def scan_args(T, Dc, N, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    A = (-torch.rand(Dc, N, generator=g, dtype=torch.float64) - 0.2).requires_grad_()
    return [r(1, Dc, T), r(1, Dc, T), A, r(1, N, T), r(1, N, T), r(Dc), r(1, Dc, T), r(Dc)]


@EXAMPLES
@given(doc_lengths(max_docs=6, max_len=11), st.sampled_from([4, 8]), st.integers(0, 99))
def test_selective_scan_kernel(lengths, chunk, seed):
    cu = cu_seqlens(lengths)
    T = int(cu[-1])
    args = scan_args(T, 4, 3, seed)
    y, h = selective_scan(*args, delta_softplus=True, return_final_state=True, chunk=chunk,
                          reset=reset_of(cu, T))
    yr, hr = ref_scan(*args, delta_softplus=True, return_final_state=True, cu_seqlens=cu)
    assert_close(y, yr, "y", RTOL)
    assert_close(h, hr, "final state", RTOL)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad((y * w).sum() + h.sum(), args)
    want = torch.autograd.grad((yr * w).sum() + hr.sum(), args)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), got, want,
                          strict=True):
        kernel_close(f"d/d{name}", a, b, torch.float64)


@EXAMPLES
@given(doc_lengths(max_docs=5, max_len=20), st.one_of(st.none(), st.integers(1, 6)),
       st.booleans(), st.integers(0, 99))
def test_windowed_readout_kernel(lengths, window, fading, seed):
    cu = cu_seqlens(lengths)
    fading = fading and window is not None
    T = int(cu[-1])
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(1, T, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
           for _ in range(5)]
    fk, fv = (qkv[3], qkv[4]) if fading else (None, None)
    o = windowed_readout(*qkv[:3], window, fk, fv, cu_seqlens=torch.from_numpy(cu))
    want = ref_readout(*qkv[:3], window, fk, fv, cu_seqlens=cu)
    assert_close(o, want, "o", RTOL)
    w = torch.randn(o.shape, generator=g, dtype=torch.float64)
    args = qkv if fading else qkv[:3]
    got = torch.autograd.grad((o * w).sum(), args)
    ref = torch.autograd.grad((want * w).sum(), args)
    names = ("q", "k", "v", "fading_k", "fading_v")[:len(args)]
    for name, a, b in zip(names, got, ref, strict=True):
        # relative RMSE, absolute where the true gradient is 0 (dq of a lone key)
        kernel_close(f"d/d{name}", a, b, torch.float64)


def test_kernels_keep_a_non_finite_value_in_its_document():
    cu = cu_seqlens([5, 6, 7])
    T = 18
    keep = np.r_[0:8, 11:18]  # documents 0 and 2, and document 1 before the NaN
    args = [a.detach() for a in scan_args(T, 2, 2, 0)]
    clean = selective_scan(*args, delta_softplus=True, chunk=8, reset=reset_of(cu, T))
    args[0] = args[0].clone()
    args[0][0, :, 8] = math.nan
    y = selective_scan(*args, delta_softplus=True, chunk=8, reset=reset_of(cu, T))
    assert torch.isfinite(y[..., keep]).all()
    assert_close(y[..., keep], clean[..., keep], "scan: other documents", RTOL)
    qkv = [torch.randn(1, T, 1, 2, dtype=torch.float64) for _ in range(3)]
    clean = windowed_readout(*qkv, None, cu_seqlens=torch.from_numpy(cu))
    qkv[2] = qkv[2].clone()
    qkv[2][0, 8] = math.nan
    o = windowed_readout(*qkv, None, cu_seqlens=torch.from_numpy(cu))
    assert torch.isfinite(o[0, keep]).all()
    assert_close(o[0, keep], clean[0, keep], "readout: other documents", RTOL)
    assert torch.isnan(o[0, 8:11]).all()


LAYERS = {
    "transformer_full": memcore.spec.transformer(4, 2, window=None),
    "transformer_windowed": memcore.spec.transformer(4, 2, window=3),
    "mamba": memcore.spec.mamba(4, d_state=3),
    "bmojo_f": memcore.spec.bmojo_f(4, 2, window=2, d_state=2),
    "bmojo": memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_on_the_kernels(name, monkeypatch):
    monkeypatch.setenv(implementation.ENV, "triton")
    calls = spy_calls(monkeypatch, scan_kernel, "selective_scan", "reset")
    check_packed_torch_layer(LAYERS[name], "triton", name, RTOL)
    if name in ("mamba", "bmojo_f", "bmojo"):
        assert True in calls  # the packed scan ran on the kernel, with its restarts


def test_mamba_ssm_kernel_takes_no_cu_seqlens():
    args = [a.detach() for a in scan_args(6, 2, 2, 0)]
    with pytest.raises(ValueError, match="mamba_ssm.*cu_seqlens"):
        t_scan.selective_scan(*args, cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32),
                              implementation="mamba_ssm")
