"""Packed sequences on the JAX backend (DESIGN 5a), float64 (x64 is on for the test session,
tests/conftest.py): the primitives' packed forms and every realization's packed forward equal
the separate forwards of the documents, concatenated, and the reference's packed forward; the
last document's state; gradients through the packed scan (resets inside and between its
chunks, one and several groups of chunks) equal the reference's; a non-finite token changes
nothing outside its document; the packed model forward runs under ``jax.jit`` with the
boundaries traced, one trace serving every packing of the same length."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from memcore.backends.jax import selective_scan_vjp
from memcore.backends.jax.associative_readout import associative_readout
from memcore.backends.jax.leaky_average import leaky_average
from memcore.backends.jax.selective_scan import scan_core, selective_scan
from memcore.backends.jax.windowed_readout import windowed_readout
from memcore.spec.reference import layers as L
from memcore.spec.reference import model as M
from memcore.spec.reference.associative_readout import associative_readout as ref_assoc
from memcore.spec.reference.selective_scan import selective_scan as ref_scan
from memcore.spec.reference.windowed_readout import windowed_readout as ref_readout
from refcheck import assert_close, assert_states_equal, each_realization, inputs, is_model, params64

import memcore
from tests.packed.packed_cases import (
    AWKWARD,
    BAD_CU_SEQLENS,
    check_packed,
    cu_seqlens,
    doc_lengths,
    record,
    split,
)

RTOL = 1e-9  # DESIGN 6: a backend against the reference, float64
EXAMPLES = settings(max_examples=2, deadline=None)  # and the @example rows: compiles dominate


def j(a):
    return None if a is None else jnp.asarray(a)


def np_(a):
    return np.asarray(a)


# --- primitives -----------------------------------------------------------------------------

def _scan_args(lengths, N, grouped, seed, Dc=4):
    cu = cu_seqlens(lengths)
    T = int(cu[-1])
    rng = np.random.default_rng(seed)
    bc = (1, 2, N, T) if grouped else (1, N, T)
    args = [rng.standard_normal((1, Dc, T)), rng.standard_normal((1, Dc, T)),
            -rng.random((Dc, N)) - 0.2, rng.standard_normal(bc), rng.standard_normal(bc),
            rng.standard_normal(Dc), rng.standard_normal((1, Dc, T)), rng.standard_normal(Dc)]
    return cu, T, args


@settings(max_examples=1, deadline=None)
@given(doc_lengths(max_docs=6, max_len=12), st.integers(1, 3), st.booleans(),
       st.sampled_from([None, 3, 4]), st.integers(0, 99))
@example(AWKWARD[0], 2, True, 3, 0)
@example(AWKWARD[1], 1, False, 4, 1)
def test_selective_scan_forward_and_gradients(lengths, N, grouped, chunk, seed):
    """The packed scan against the reference, values and gradients of every argument; with
    short chunks (3, 4) documents start inside chunks, at chunk starts and span several, and
    with ``GROUP_ELEMENTS`` small the backward runs over several groups of chunks."""
    cu, T, args = _scan_args(lengths, N, grouped, seed)
    reset = jnp.asarray(np.isin(np.arange(T), cu[:-1]))  # the documents' first tokens
    w = np.random.default_rng(seed + 1).standard_normal((1, 4, T))
    h0 = jnp.zeros((1, 4, N))

    def loss(*a):
        if chunk is None:  # the public op (one chunk: chunk_len(T) >= 16)
            y, h = selective_scan(*a, delta_softplus=True, return_final_state=True,
                                  cu_seqlens=j(cu))
        else:
            y, h = scan_core(*a, True, h0, chunk, reset)
        return jnp.sum(y * w) + jnp.sum(h), (y, h)

    saved = selective_scan_vjp.GROUP_ELEMENTS
    selective_scan_vjp.GROUP_ELEMENTS = 1 if chunk == 3 else saved  # one chunk per group
    try:
        grads, (y, h) = jax.jit(jax.grad(loss, argnums=tuple(range(8)), has_aux=True))(
            *map(j, args))
    finally:
        selective_scan_vjp.GROUP_ELEMENTS = saved
    ta = [torch.tensor(a, requires_grad=True) for a in args]
    yr, hr = ref_scan(*ta, delta_softplus=True, return_final_state=True, cu_seqlens=cu)
    assert_close(np_(y), yr.detach(), "y", RTOL)
    assert_close(np_(h), hr.detach(), "final state", RTOL)
    want = torch.autograd.grad((yr * torch.from_numpy(w)).sum() + hr.sum(), ta)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), grads, want,
                          strict=True):
        assert_close(np_(a), b, f"d/d{name}", RTOL)


@settings(max_examples=2, deadline=None)
@given(doc_lengths(max_docs=6, max_len=12), st.integers(0, 99))
@example(AWKWARD[0], 0)
def test_selective_scan_equals_separate_calls(lengths, seed):
    cu, T, args = _scan_args(lengths, 2, False, seed)
    timed = (0, 1, 3, 4, 6)  # u, delta, B, C, z carry time on their last axis

    def call(a, cu_):
        y, h = selective_scan(*map(j, a), delta_softplus=True, return_final_state=True,
                              cu_seqlens=j(cu_))
        return np_(y), np_(h)

    y, h = call(args, cu)
    parts = [call([a[..., s:e] if i in timed else a for i, a in enumerate(args)], None)
             for s, e in zip(cu[:-1], cu[1:], strict=True)]
    want = np.concatenate([p[0] for p in parts], axis=-1)
    record("jax", "selective_scan", float(np.max(np.abs(y - want)) / np.max(np.abs(want))))
    assert_close(y, want, "packed vs separate", RTOL)
    assert_close(h, parts[-1][1], "last document's state", RTOL)


def test_selective_scan_nan_stays_in_its_document():
    """A NaN input in document 1 of 3: documents 0 and 2 compute as clean, forward and
    backward (the adjoint stops at a document's start: where, never a zero decay)."""
    lengths = [5, 6, 7]
    cu, T, args = _scan_args(lengths, 2, False, 3)
    keep = np.r_[0:5, 11:18]
    w = np.zeros((1, 4, T))
    w[..., keep] = np.random.default_rng(0).standard_normal((1, 4, len(keep)))

    def grad_u(u):
        def loss(u_):
            y = scan_core(u_, *map(j, args[1:]), True, jnp.zeros((1, 4, 2)), 4,
                          jnp.asarray(np.isin(np.arange(T), cu[:-1])))[0]
            return jnp.sum(jnp.where(w != 0, y * w, 0.0)), y
        return jax.jit(jax.grad(loss, has_aux=True))(u)

    g_clean, y_clean = grad_u(j(args[0]))
    bad = args[0].copy()
    bad[0, :, 8] = math.nan
    g_bad, y_bad = grad_u(j(bad))
    assert np.all(np.isfinite(np_(y_bad)[..., keep]))
    assert_close(np_(y_bad)[..., keep], np_(y_clean)[..., keep], "other documents", RTOL)
    assert np.all(np.isfinite(np_(g_bad)[..., keep]))
    assert_close(np_(g_bad)[..., keep], np_(g_clean)[..., keep], "their gradients", RTOL)


@EXAMPLES
@given(doc_lengths(max_docs=6, max_len=12), st.integers(0, 99))
@example(AWKWARD[0], 0)
def test_leaky_average(lengths, seed):
    cu = cu_seqlens(lengths)
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, int(cu[-1]), 2, 3))
    log_decay = j(-np.abs(rng.standard_normal(2)))

    def run(x, cu_):
        y, h = leaky_average(j(x), log_decay, return_final_state=True, cu_seqlens=j(cu_))
        return np_(y), {"kbar": np_(h)}, None

    check_packed(run, k, cu, "jax", "leaky_average", RTOL)


@EXAMPLES
@given(doc_lengths(), st.one_of(st.none(), st.integers(1, 5)), st.booleans(),
       st.integers(0, 99))
@example(AWKWARD[1], 2, True, 0)
def test_windowed_readout(lengths, window, fading, seed):
    cu = cu_seqlens(lengths)
    fading = fading and window is not None
    x = np.random.default_rng(seed).standard_normal((1, int(cu[-1]), 5, 2, 3))

    def run(a, cu_, op=windowed_readout, conv=j):
        fk, fv = (conv(a[..., 3, :, :]), conv(a[..., 4, :, :])) if fading else (None, None)
        o, state = op(conv(a[..., 0, :, :]), conv(a[..., 1, :, :]), conv(a[..., 2, :, :]),
                      window, fk, fv, return_final_state=True,
                      cu_seqlens=None if cu_ is None else conv(cu_))
        return np_(o), {k: (v if k == "pos" else np_(v)) for k, v in state.items()}, None

    check_packed(run, x, cu, "jax", "windowed_readout", RTOL)
    ref = run(x, cu, ref_readout, lambda a: a)
    got = run(x, cu)
    assert_close(got[0], ref[0], "against the reference", RTOL)
    assert_states_equal(got[1], ref[1], "state against the reference", RTOL)


@EXAMPLES
@given(doc_lengths(), st.one_of(st.none(), st.integers(1, 4)), st.integers(0, 99))
@example(AWKWARD[0], 2, 0)
def test_associative_readout(lengths, capacity, seed):
    cu = cu_seqlens(lengths)
    kv = np.random.default_rng(seed).standard_normal((1, int(cu[-1]), 2, 2, 3))
    y = associative_readout(j(kv[:, :, 0]), j(kv[:, :, 1]), capacity, j(cu))
    assert_close(np_(y), ref_assoc(kv[:, :, 0], kv[:, :, 1], capacity, cu_seqlens=cu),
                 "against the reference", RTOL)

    def run(a, cu_):
        return np_(associative_readout(j(a[:, :, 0]), j(a[:, :, 1]), capacity, j(cu_))), {}, None

    check_packed(run, kv, cu, "jax", "associative_readout", RTOL)


# --- realizations -----------------------------------------------------------------------------

def _pad(x, T: int):
    """A document padded (zeros, or token 0) to T positions along axis 1."""
    return np.pad(x, [(0, 0), (0, T - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


@each_realization
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_realization(spec_st, data, request):
    """Packed == the documents' separate JAX forwards, concatenated (each document padded to
    the longest, so that one compiled shape serves all: outputs are causal, so a document's
    come first, as they would alone) == the reference's packed forward; the state is the
    last document's (the reference's forward of that document alone: one compile fewer) and
    aux the token mean over the row."""
    name = request.node.callspec.id
    spec = data.draw(spec_st)
    lengths = data.draw(doc_lengths())
    cu = cu_seqlens(lengths)
    params = params64(spec)
    mod = memcore.realize(spec, backend="jax", params=params)
    x = inputs(spec, 1, int(cu[-1]), seed=data.draw(st.integers(0, 99)), tokens=np.int32)
    y, state, aux = mod.forward_aux(j(x), None, cu_seqlens=j(cu))
    docs = split(x, cu)
    longest = max(lengths)
    sep = [np_(mod.forward_aux(j(_pad(d, longest)))[0])[:, :d.shape[1]] for d in docs]
    want = np.concatenate(sep, axis=1)
    err = float(np.max(np.abs(np_(y) - want)) / max(np.max(np.abs(want)), 1e-300))
    record("jax", name, err)
    assert_close(np_(y), want, f"{name}: packed vs separate", RTOL)
    fwd = M.forward_aux if is_model(spec) else L.forward_aux
    _, last_state, _ = fwd(spec, params, docs[-1])
    assert_states_equal(mod.to_reference_state(state), last_state, f"{name}: final state",
                        RTOL)
    ref = fwd(spec, params, x, None, cu)
    assert_close(np_(y), ref[0], f"{name}: against the reference", RTOL)
    assert (aux is None) == (ref[2] is None)
    if aux is not None:  # the reference's aux is the token mean over the row (test_reference)
        assert abs(float(aux) - float(ref[2])) <= RTOL * max(1.0, abs(float(ref[2])))


SPECS = {
    "mamba": memcore.spec.mamba(4, d_state=3),
    "bmojo": memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
    "transformer": memcore.spec.transformer(4, 2, window=None),
    "mosaic": memcore.spec.mosaic(4, 2, capacity=2),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradients_match_the_reference(name):
    spec = SPECS[name]
    cu = cu_seqlens(AWKWARD[1])
    params = params64(spec)
    mod = memcore.realize(spec, backend="jax", params=params)
    x = inputs(spec, 1, int(cu[-1]), seed=3)
    w = np.random.default_rng(1).standard_normal(x.shape)
    gx = jax.grad(lambda a: jnp.sum(mod(a, cu_seqlens=j(cu))[0] * w))(j(x))
    xt = torch.tensor(x, requires_grad=True)
    yr, _, _ = L.forward_aux(spec, params, xt, None, cu)
    (gr,) = torch.autograd.grad((yr * torch.from_numpy(w)).sum(), xt)
    assert_close(np_(gx), gr, f"{name}: d/dx", RTOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_non_finite_token_stays_in_its_document(name):
    """A NaN in document 1 (of 3) leaves documents 0 and 2 exactly as they are alone, and
    document 1 before the NaN unchanged (DESIGN 6)."""
    spec = SPECS[name]
    cu = cu_seqlens([5, 6, 7])
    mod = memcore.realize(spec, backend="jax", params=params64(spec))
    x = inputs(spec, 1, int(cu[-1]), seed=5)
    clean, _ = mod(j(x), cu_seqlens=j(cu))
    bad = x.copy()
    bad[0, 8] = math.nan  # position 3 of document 1
    y, _ = mod(j(bad), cu_seqlens=j(cu))
    keep = np.r_[0:8, 11:18]
    assert np.all(np.isfinite(np_(y)[0, keep]))
    assert_close(np_(y)[0, keep], np_(clean)[0, keep], f"{name}: other documents", RTOL)
    assert not np.all(np.isfinite(np_(y)[0, 8])), "the NaN's own position reads it"


def test_packed_model_under_jit_with_traced_boundaries():
    """One trace, cu_seqlens a traced argument: two packings of the same length give each
    its own (different) result, equal to the reference's packed forward."""
    spec = memcore.spec.model(
        [memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
         memcore.spec.mosaic(4, 2)], vocab_size=7, ffn="persistent", mlp_ratio=2)
    params = params64(spec)
    mod = memcore.realize(spec, backend="jax", params=params)
    tokens = inputs(spec, 1, 12, seed=2, tokens=np.int32)
    traces = []

    @jax.jit
    def run(tok, cu):
        traces.append(1)
        logits, state, aux = mod.forward_aux(tok, cu_seqlens=cu)
        return logits, state.pos, aux

    outs = []
    for lengths in ([3, 1, 8], [5, 6, 1]):
        cu = cu_seqlens(lengths)
        logits, pos, aux = run(j(tokens), j(cu))
        ref = M.forward_aux(spec, params, tokens, None, cu)
        assert_close(np_(logits), ref[0], f"{lengths}: against the reference", RTOL)
        assert int(pos) == lengths[-1] == ref[1]["pos"]
        assert abs(float(aux) - float(ref[2])) <= RTOL * max(1.0, abs(float(ref[2])))
        outs.append(np_(logits))
    assert len(traces) == 1, f"traced {len(traces)} times for one length of cu_seqlens"
    assert np.max(np.abs(outs[0] - outs[1])) > 1e-3, "different packings, same logits"


# --- errors -----------------------------------------------------------------------------------

ESPEC = memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2)
BAD = BAD_CU_SEQLENS


@pytest.mark.parametrize("case", list(BAD))
def test_bad_cu_seqlens_is_named(case):
    cu, words = BAD[case]
    layer = memcore.realize(ESPEC, backend="jax", params=params64(ESPEC))
    x = j(np.random.default_rng(0).standard_normal((1, 6, 4)))
    with pytest.raises(ValueError, match="cu_seqlens") as e:
        layer(x, cu_seqlens=cu if isinstance(cu, list) else j(cu))
    assert words in str(e.value)


def test_batch_state_and_traced_shapes_are_checked():
    layer = memcore.realize(ESPEC, backend="jax", params=params64(ESPEC))
    cu = j(np.array([0, 2, 6], np.int32))
    x = j(np.random.default_rng(0).standard_normal((2, 6, 4)))
    with pytest.raises(ValueError, match="cu_seqlens.*batch 1"):
        layer(x, cu_seqlens=cu)
    _, state = layer(x[:1])
    with pytest.raises(ValueError, match="cu_seqlens.*state=None"):
        layer(x[:1], state, cu_seqlens=cu)
    # under jit the boundaries are unknown; dtype, shape and count are still checked
    for bad, words in ((jnp.array([0, 2, 6], jnp.int64), "int32"),
                       (jnp.zeros((1, 3), jnp.int32), "1-D"),
                       (jnp.arange(8, dtype=jnp.int32), "more than the T=6 tokens")):
        with pytest.raises(ValueError, match="cu_seqlens") as e:
            jax.jit(lambda a, c: layer(a, cu_seqlens=c)[0])(x[:1], bad)
        assert words in str(e.value)


def test_ops_route_packed_jax_calls():
    """``memcore.ops`` passes cu_seqlens with JAX arrays to this backend: the reference's
    packed result, as a JAX array."""
    from memcore import ops

    cu = cu_seqlens([3, 1, 7])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 11, 2, 3)) for _ in range(3))
    ld = -np.abs(rng.standard_normal(2))
    cases = {"leaky_average": (k, ld), "associative_readout": (k, v),
             "windowed_readout": (q, k, v, 2)}
    for name, args in cases.items():
        got = getattr(ops, name)(*(j(a) if isinstance(a, np.ndarray) else a for a in args),
                                 cu_seqlens=j(cu))
        assert isinstance(got, jax.Array), name
        want = getattr(ops, name)(*args, cu_seqlens=cu)
        assert_close(np_(got), want, f"ops.{name}", RTOL)


def test_packed_bmojo_with_kernels_asked_for_equals_reference(monkeypatch):
    """MEMCORE_KERNELS=pallas: a packed bmojo runs its fading scan on the kernel and its
    readout (which reads the store) on plain JAX, and still equals the reference."""
    monkeypatch.setenv("MEMCORE_KERNELS", "pallas")
    spec = SPECS["bmojo"]
    params = params64(spec)
    mod = memcore.realize(spec, backend="jax", params=params)
    cu = cu_seqlens([4, 1, 5])
    x = inputs(spec, 1, 10, seed=4)
    y, _ = mod(j(x), cu_seqlens=j(cu))
    assert_close(np_(y), L.forward(spec, params, x, None, cu)[0], "bmojo", RTOL)
