"""Packed sequences on the torch backend (DESIGN 5a), float64: the primitives' packed forms
and every realization's packed forward equal the separate forwards of the documents,
concatenated, and the reference's packed forward; the last document's state; gradients
through the packed paths (the scan's restarts, the banded softmax's document masks) equal
the reference's; a non-finite token changes nothing outside its document."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memcore.backends.torch.associative_readout import associative_readout
from memcore.backends.torch.leaky_average import leaky_average
from memcore.backends.torch.selective_scan import selective_scan
from memcore.backends.torch.windowed_readout import windowed_readout
from memcore.spec.reference import layers as L
from memcore.spec.reference import model as M
from memcore.spec.reference.associative_readout import associative_readout as ref_assoc
from memcore.spec.reference.selective_scan import selective_scan as ref_scan
from memcore.spec.reference.windowed_readout import windowed_readout as ref_readout
from refcheck import assert_close, each_realization, inputs, is_model, params64

import memcore
from tests.packed.packed_cases import check_packed, cu_seqlens, doc_lengths

RTOL = 1e-9  # DESIGN 6: a backend against the reference, float64
EXAMPLES = settings(max_examples=4, deadline=None)


def t64(a):
    return torch.from_numpy(np.asarray(a))


@EXAMPLES
@given(doc_lengths(max_docs=6, max_len=12), st.integers(1, 3), st.booleans(),
       st.integers(0, 99))
def test_selective_scan_forward_and_gradients(lengths, N, grouped, seed):
    cu = cu_seqlens(lengths)
    T, Dc = int(cu[-1]), 4
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    bc = (1, 2, N, T) if grouped else (1, N, T)
    args = [r(1, Dc, T), r(1, Dc, T), (-torch.rand(Dc, N, generator=g, dtype=torch.float64)
                                       - 0.2).requires_grad_(), r(*bc), r(*bc), r(Dc),
            r(1, Dc, T), r(Dc)]
    y, h = selective_scan(*args, delta_softplus=True, return_final_state=True,
                          cu_seqlens=t64(cu), implementation="torch")
    yr, hr = ref_scan(*args, delta_softplus=True, return_final_state=True, cu_seqlens=cu)
    assert_close(y, yr, "y", RTOL)
    assert_close(h, hr, "final state", RTOL)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((y * w).sum() + h.sum(), args)
    want = torch.autograd.grad((yr * w).sum() + hr.sum(), args)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), got, want,
                          strict=True):
        assert_close(a, b, f"d/d{name}", RTOL)
    # separate documents, concatenated (the property itself, on the torch path)
    parts = [selective_scan(*(a[..., s:e] if a.ndim >= 3 and a.shape[-1] == T else a
                              for a in args), delta_softplus=True, return_final_state=True,
                            implementation="torch") for s, e in zip(cu[:-1], cu[1:], strict=True)]
    assert_close(y, torch.cat([p[0] for p in parts], -1), "packed vs separate", RTOL)
    assert_close(h, parts[-1][1], "last document's state", RTOL)


@EXAMPLES
@given(doc_lengths(max_docs=6, max_len=20), st.sampled_from([16, 3]), st.integers(0, 99))
def test_leaky_average(lengths, chunk, seed):
    from memcore.backends.torch import selective_scan as t_scan

    cu = cu_seqlens(lengths)
    rng = np.random.default_rng(seed)
    k = t64(rng.standard_normal((1, int(cu[-1]), 2, 3)))
    log_decay = t64(-np.abs(rng.standard_normal(2)))
    saved = t_scan.CHUNK, t_scan.GROUP_ELEMENTS
    # small chunks and groups: boundaries fall inside chunks, chunk groups and between them
    t_scan.CHUNK, t_scan.GROUP_ELEMENTS = chunk, (1 << 24 if chunk == 16 else 40)
    try:
        def run(x, cu_):
            y, h = leaky_average(x, log_decay, return_final_state=True,
                                 cu_seqlens=None if cu_ is None else t64(cu_))
            return y, {"kbar": h}, None

        check_packed(run, k, cu, "torch", "leaky_average", RTOL)
    finally:
        t_scan.CHUNK, t_scan.GROUP_ELEMENTS = saved


@EXAMPLES
@given(doc_lengths(), st.one_of(st.none(), st.integers(1, 5)), st.booleans(),
       st.integers(0, 99))
def test_windowed_readout(lengths, window, fading, seed):
    cu = cu_seqlens(lengths)
    fading = fading and window is not None
    x = t64(np.random.default_rng(seed).standard_normal((1, int(cu[-1]), 5, 2, 3)))

    def run(a, cu_, op=windowed_readout):
        fk, fv = (a[..., 3, :, :], a[..., 4, :, :]) if fading else (None, None)
        o, state = op(a[..., 0, :, :], a[..., 1, :, :], a[..., 2, :, :], window, fk, fv,
                      return_final_state=True, cu_seqlens=None if cu_ is None else t64(cu_))
        return o, state, None

    check_packed(run, x, cu, "torch", "windowed_readout", RTOL)
    assert_close(run(x, cu)[0], run(x, cu, ref_readout)[0], "against the reference", RTOL)


@EXAMPLES
@given(doc_lengths(), st.one_of(st.none(), st.integers(1, 4)), st.integers(0, 99))
def test_associative_readout(lengths, capacity, seed):
    cu = cu_seqlens(lengths)
    kv = t64(np.random.default_rng(seed).standard_normal((1, int(cu[-1]), 2, 2, 3)))
    y = associative_readout(kv[:, :, 0], kv[:, :, 1], capacity, t64(cu))
    assert_close(y, ref_assoc(kv[:, :, 0], kv[:, :, 1], capacity, cu_seqlens=cu),
                 "against the reference", RTOL)

    def run(a, cu_):
        return associative_readout(a[:, :, 0], a[:, :, 1], capacity,
                                   None if cu_ is None else t64(cu_)), {}, None

    check_packed(run, kv, cu, "torch", "associative_readout", RTOL)


def _realized(spec):
    params = params64(spec)
    return params, memcore.realize(spec, backend="torch", params=params)


@each_realization
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_realization(spec_st, data, request):
    spec = data.draw(spec_st)
    cu = cu_seqlens(data.draw(doc_lengths()))
    params, mod = _realized(spec)
    x = t64(inputs(spec, 1, int(cu[-1]), seed=data.draw(st.integers(0, 99))))

    def run(a, cu_):
        return mod.forward_aux(a, None, cu_seqlens=None if cu_ is None else t64(cu_))

    check_packed(run, x, cu, "torch", request.node.callspec.id, RTOL)
    ref = (M.forward_aux if is_model(spec) else L.forward_aux)(spec, params, x.numpy(), None,
                                                               cu)
    assert_close(run(x, cu)[0], ref[0], f"{spec.kind}: against the reference", RTOL)


SPECS = {
    "mamba": memcore.spec.mamba(4, d_state=3),
    "bmojo": memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
    "transformer": memcore.spec.transformer(4, 2, window=None),
    "mosaic": memcore.spec.mosaic(4, 2, capacity=2),
}


@settings(max_examples=2, deadline=None)
@given(doc_lengths(max_docs=4, max_len=7), st.sampled_from(sorted(SPECS)))
def test_gradients_match_the_reference(lengths, name):
    spec = SPECS[name]
    cu = cu_seqlens(lengths)
    params, mod = _realized(spec)
    x = t64(inputs(spec, 1, int(cu[-1]), seed=3)).requires_grad_()
    y, _ = mod(x, cu_seqlens=t64(cu))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    yr, _, _ = L.forward_aux(spec, params, x, None, cu)
    (gr,) = torch.autograd.grad((yr * w).sum(), x)
    assert_close(gx, gr, f"{name}: d/dx", RTOL)


def test_non_finite_token_stays_in_its_document():
    """A NaN in document 1 (of 3) leaves documents 0 and 2 exactly as they are alone, and
    document 1 before the NaN unchanged (DESIGN 6)."""
    lengths = [5, 6, 7]
    cu = cu_seqlens(lengths)
    for spec in SPECS.values():
        _, mod = _realized(spec)
        x = t64(inputs(spec, 1, int(cu[-1]), seed=5))
        clean, _ = mod(x, cu_seqlens=t64(cu))
        bad = x.clone()
        bad[0, 8] = math.nan  # position 3 of document 1
        y, _ = mod(bad, cu_seqlens=t64(cu))
        keep = np.r_[0:8, 11:18]
        assert torch.equal(torch.isfinite(y[0, keep]).all(-1), torch.ones(15, dtype=torch.bool))
        assert_close(y[0, keep], clean[0, keep], f"{spec.kind}: other documents", RTOL)
