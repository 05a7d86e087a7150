"""Packed sequences in the reference (DESIGN 5a), float64: every primitive with a sequence
state and every realization's packed forward equal the separate forwards of the documents,
concatenated, with the last document's state; boundaries inside chunks and windows,
length-1 documents, many documents."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from memcore.spec.reference import layers as L
from memcore.spec.reference import model as M
from memcore.spec.reference.associative_readout import associative_readout
from memcore.spec.reference.leaky_average import leaky_average
from memcore.spec.reference.selective_scan import selective_scan
from memcore.spec.reference.windowed_readout import windowed_readout
from refcheck import RTOL, assert_close, each_realization, inputs, is_model, params64

import memcore
from tests.packed.packed_cases import check_packed, cu_seqlens, doc_lengths

EXAMPLES = settings(max_examples=4, deadline=None)


@EXAMPLES
@given(doc_lengths(max_docs=6), st.integers(1, 3), st.booleans(), st.integers(0, 99))
def test_selective_scan(lengths, N, grouped, seed):
    cu = cu_seqlens(lengths)
    T, Dc = int(cu[-1]), 4
    rng = np.random.default_rng(seed)
    bc = (1, 2, N, T) if grouped else (1, N, T)
    A = -np.exp(rng.standard_normal((Dc, N)))
    D, bias = rng.standard_normal(Dc), rng.standard_normal(Dc)
    # u, delta, z [1, Dc, T] and B, C [1, (G,) N, T]: the time axis is the last of each
    seqs = [rng.standard_normal((1, Dc, T)) for _ in range(3)] + [
        rng.standard_normal(bc) for _ in range(2)]

    def run(xs, cu_):
        u, delta, z, B, C = xs
        y, h = selective_scan(u, delta, A, B, C, D, z, bias, True, return_final_state=True,
                              cu_seqlens=cu_)
        return y, h

    y, h = run(seqs, cu)
    parts = [run([a[..., s:e] for a in seqs], None)
             for s, e in zip(cu[:-1], cu[1:], strict=True)]
    assert_close(y, np.concatenate([p[0] for p in parts], axis=-1), "packed vs separate")
    assert_close(h, parts[-1][1], "the last document's state")


@EXAMPLES
@given(doc_lengths(max_docs=6, max_len=20), st.integers(0, 99))
def test_leaky_average(lengths, seed):
    cu = cu_seqlens(lengths)
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, int(cu[-1]), 2, 3))
    log_decay = -np.abs(rng.standard_normal(2))

    def run(x, cu_):
        y, h = leaky_average(x, log_decay, return_final_state=True, cu_seqlens=cu_)
        return y, {"kbar": h}, None

    check_packed(run, k, cu, "reference", "leaky_average", RTOL)


@EXAMPLES
@given(doc_lengths(), st.one_of(st.none(), st.integers(1, 5)), st.booleans(),
       st.integers(0, 99))
def test_windowed_readout(lengths, window, fading, seed):
    cu = cu_seqlens(lengths)
    fading = fading and window is not None
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, int(cu[-1]), 5, 2, 3))  # q, k, v, fading k, fading v

    def run(a, cu_):
        fk, fv = (a[..., 3, :, :], a[..., 4, :, :]) if fading else (None, None)
        o, state = windowed_readout(a[..., 0, :, :], a[..., 1, :, :], a[..., 2, :, :], window,
                                    fk, fv, return_final_state=True, cu_seqlens=cu_)
        return o, state, None

    check_packed(run, x, cu, "reference", "windowed_readout", RTOL)


@EXAMPLES
@given(doc_lengths(), st.one_of(st.none(), st.integers(1, 4)), st.integers(0, 99))
def test_associative_readout(lengths, capacity, seed):
    cu = cu_seqlens(lengths)
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((1, int(cu[-1]), 2, 2, 3))

    def run(a, cu_):
        return associative_readout(a[:, :, 0], a[:, :, 1], capacity, cu_seqlens=cu_), {}, None

    check_packed(run, kv, cu, "reference", "associative_readout", RTOL)


@each_realization
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_realization(spec_st, data, request):
    spec = data.draw(spec_st)
    cu = cu_seqlens(data.draw(doc_lengths()))
    params = params64(spec)
    x = inputs(spec, 1, int(cu[-1]), seed=data.draw(st.integers(0, 99)))
    fwd = M.forward_aux if is_model(spec) else L.forward_aux

    def run(a, cu_):
        return fwd(spec, params, a, None, cu_)

    check_packed(run, x, cu, "reference", request.node.callspec.id, RTOL)


@settings(max_examples=3, deadline=None)
@given(doc_lengths(), st.integers(0, 99))
def test_realized_object_takes_cu_seqlens(lengths, seed):
    spec = memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2)
    layer = memcore.realize(spec, backend="reference", params=params64(spec))
    cu = cu_seqlens(lengths)
    x = inputs(spec, 1, int(cu[-1]), seed=seed)

    def run(a, cu_):
        return layer.forward_aux(a, None, cu_seqlens=cu_)

    check_packed(run, x, cu, "reference", "bmojo (realized)", RTOL)
    y, _ = layer(x, cu_seqlens=cu)
    assert y.shape == x.shape


def test_packed_runs_on_torch_and_jax_arrays():
    """The reference's packed forms run on the other Array API libraries, with the same
    result as on numpy (bmojo on torch; a windowed transformer on JAX, whose eager dispatch
    is slow on the store's many small operations)."""
    import jax.numpy as jnp
    import torch

    cu = cu_seqlens([3, 1, 5])
    for spec, lib in ((memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2,
                                          d_state=2), "torch"),
                      (memcore.spec.transformer(4, 2, window=2), "jax")):
        params = params64(spec)
        x = inputs(spec, 1, 9, seed=1)
        want, state, _ = L.forward_aux(spec, params, x, None, cu)
        conv = torch.from_numpy if lib == "torch" else jnp.asarray
        got, got_state, _ = L.forward_aux(spec, params, conv(x), None, conv(cu))
        assert_close(got, want, f"{spec.kind} on {lib} arrays")
        assert got_state["pos"] == state["pos"] == 5
        assert_close(got_state["k"], state["k"], f"{spec.kind} on {lib}: the last ring")


def test_non_finite_token_stays_in_its_document():
    """A NaN in document 1 (of 3) leaves documents 0 and 2 as they are, and document 1
    before it (DESIGN 6: masks select, they never multiply by zero)."""
    cu = cu_seqlens([5, 6, 7])
    keep = np.r_[0:8, 11:18]
    for spec in (memcore.spec.mamba(4, d_state=3),
                 memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
                 memcore.spec.transformer(4, 2, window=None), memcore.spec.mosaic(4, 2),
                 memcore.spec.persistent(4, 2, slots=3)):
        params = params64(spec)
        x = inputs(spec, 1, 18, seed=5)
        clean, _, _ = L.forward_aux(spec, params, x, None, cu)
        bad = x.copy()
        bad[0, 8] = np.nan  # position 3 of document 1
        y, _, _ = L.forward_aux(spec, params, bad, None, cu)
        assert np.isfinite(y[0, keep]).all(), spec.kind
        assert_close(y[0, keep], clean[0, keep], f"{spec.kind}: other documents")
