"""Packed sequences in the Pallas kernels (DESIGN 5a), interpreted on the CPU in float64 (x64 is
on for the test session, tests/conftest.py): the selective scan's restarts (``reset``) and the
windowed readout's document masks (``cu_seqlens``, traced) against the spec reference, forward
and gradients, and their plain-JAX twins; a non-finite token stays in its document; the JAX
backend's packed primitives and layers with the kernels on (MEMCORE_KERNELS=pallas) run them
and equal the separate forwards and the reference; a store in a packed row is refused by the
kernel and kept on JAX by the layer; both kernels still lower for a GPU with the new inputs."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from memcore.backends.jax import implementation as impl  # noqa: E402
from memcore.backends.jax.selective_scan import selective_scan as jax_scan  # noqa: E402
from memcore.backends.jax.windowed_readout import packed_readout  # noqa: E402
from memcore.backends.jax.windowed_readout import windowed_readout as jax_readout  # noqa: E402
from memcore.kernels.pallas.selective_scan import selective_scan, selective_scan_ref  # noqa: E402
from memcore.kernels.pallas.windowed_readout import (  # noqa: E402
    windowed_readout,
    windowed_readout_ref,
)
from memcore.spec.reference import layers as L  # noqa: E402
from memcore.spec.reference.selective_scan import selective_scan as ref_scan  # noqa: E402
from memcore.spec.reference.windowed_readout import windowed_readout as ref_readout  # noqa: E402
from pallascheck import check, rel_rmse  # noqa: E402
from refcheck import assert_close, assert_states_equal, inputs, params64, rel_err  # noqa: E402

import memcore  # noqa: E402
from tests.kernels import test_pallas_lowering as lowering  # noqa: E402
from tests.packed.packed_cases import AWKWARD, cu_seqlens, doc_lengths, record  # noqa: E402

RTOL = 1e-9  # DESIGN 6: kernels in float64 (the gradients: pallascheck's relative RMSE)
F64 = jnp.float64
EXAMPLES = settings(max_examples=2, deadline=None)  # and the @example rows: interpreting is slow
SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def np_(a):
    return np.asarray(a)


def reset_of(cu, T):
    return jnp.asarray(np.isin(np.arange(T), cu[:-1]))


def scan_args(T, Dc, N, grouped, seed):
    rng = np.random.default_rng(seed)
    bc = (1, 2, N, T) if grouped else (1, N, T)
    return [rng.standard_normal((1, Dc, T)), rng.standard_normal((1, Dc, T)),
            -rng.random((Dc, N)) - 0.2, rng.standard_normal(bc), rng.standard_normal(bc),
            rng.standard_normal(Dc), rng.standard_normal((1, Dc, T)), rng.standard_normal(Dc)]


def _scan_loss(w, with_h0):
    """The kernel's loss sum(y w) + sum(h_T), differentiable in every input and (with
    ``with_h0``) an initial state h0, which the reset at t = 0 drops: a packed row starts
    from zero."""
    def loss(reset, *a):
        *args, h0 = a
        y, h = selective_scan(*args, delta_softplus=True, return_final_state=True,
                              initial_state=h0 if with_h0 else None, reset=reset,
                              interpret=True, poison=True)
        return jnp.sum(y * w) + jnp.sum(h), (y, h)
    return loss


# --- the selective scan kernel -----------------------------------------------------------------

@EXAMPLES
@given(doc_lengths(max_docs=6, max_len=11), st.booleans(), st.integers(0, 99))
@example(AWKWARD[0], True, 0)  # 18 tokens: documents across the chunk of 16, length-1 ones
@example([3, 30, 1], False, 1)  # a document over three chunks
def test_selective_scan_kernel(lengths, grouped, seed):
    cu = cu_seqlens(lengths)
    T = int(cu[-1])
    args = scan_args(T, 4, 3, grouped, seed)
    rng = np.random.default_rng(seed + 1)
    w = rng.standard_normal((1, 4, T))
    h0 = rng.standard_normal((1, 4, 3))
    grad = jax.jit(jax.grad(_scan_loss(w, True), argnums=tuple(range(1, 10)), has_aux=True))
    grads, (y, h) = grad(reset_of(cu, T), *map(jnp.asarray, args), jnp.asarray(h0))
    ta = [torch.tensor(a, requires_grad=True) for a in args]
    yr, hr = ref_scan(*ta, delta_softplus=True, return_final_state=True, cu_seqlens=cu)
    err = max(rel_err(y, yr.detach()), rel_err(h, hr.detach()))
    record("pallas", "selective_scan", err)
    assert_close(np_(y), yr.detach(), "y", RTOL)
    assert_close(np_(h), hr.detach(), "final state", RTOL)
    want = torch.autograd.grad((yr * torch.from_numpy(w)).sum() + hr.sum(), ta)
    for name, a, b in zip(SCAN_NAMES, grads[:8], want, strict=True):
        record("pallas", "selective_scan grads (RMSE)", rel_rmse(a, b.numpy()))
        check(f"d/d{name}", a, b.numpy(), F64)
    assert np.all(np_(grads[8]) == 0.0), "the reset at t = 0 drops the initial state"
    # the plain-JAX twin takes the same flags
    y2, h2 = selective_scan_ref(*map(jnp.asarray, args), softplus=True,
                                return_final_state=True, reset=reset_of(cu, T))
    assert_close(np_(y2), yr.detach(), "selective_scan_ref: y", RTOL)
    assert_close(np_(h2), hr.detach(), "selective_scan_ref: final state", RTOL)


def test_selective_scan_reset_none_and_checks():
    """No reset inside the row: the same as reset=None (which the unpacked tests hold to the
    reference); a wrong reset is refused by name."""
    T = 21
    args = list(map(jnp.asarray, scan_args(T, 3, 2, False, 5)))
    h0 = jnp.asarray(np.random.default_rng(6).standard_normal((1, 3, 2)))
    run = jax.jit(lambda r, *a: selective_scan(*a, delta_softplus=True, initial_state=h0,
                                               return_final_state=True, reset=r,
                                               interpret=True))
    none = jax.jit(lambda *a: selective_scan(*a, delta_softplus=True, initial_state=h0,
                                             return_final_state=True, interpret=True))(*args)
    flags = run(jnp.zeros(T, bool), *args)
    assert_close(np_(flags[0]), np_(none[0]), "y", 1e-15)
    assert_close(np_(flags[1]), np_(none[1]), "h_T", 1e-15)
    # one reset mid-row: the state from h0 is forgotten there, so the outputs after it change
    mid = run(jnp.arange(T) == 9, *args)
    assert_close(np_(mid[0])[..., :9], np_(none[0])[..., :9], "before the reset", 1e-15)
    assert rel_err(np_(mid[0])[..., 9:], np_(none[0])[..., 9:]) > 1e-3
    for bad in (jnp.zeros(T - 1, bool), jnp.zeros((1, T), bool), jnp.zeros(T, jnp.float32)):
        with pytest.raises(ValueError, match="reset must be"):
            selective_scan(*args, reset=bad, interpret=True)


# --- the windowed readout kernel ---------------------------------------------------------------

def _readout_loss(window, fading, g):
    def loss(cu, *a):
        fk, fv = (a[3], a[4]) if fading else (None, None)
        o = windowed_readout(*a[:3], window, fk, fv, cu_seqlens=cu, interpret=True, poison=True)
        return jnp.sum(o * g), o
    return loss


@EXAMPLES
@given(doc_lengths(max_docs=5, max_len=20), st.one_of(st.none(), st.integers(1, 6)),
       st.booleans(), st.integers(0, 99))
@example(AWKWARD[0], 3, True, 0)  # length-1 documents, boundaries inside a tile of 16
@example([7, 19, 1, 13], None, False, 1)  # full causal attention within documents, 3 tiles
def test_windowed_readout_kernel(lengths, window, fading, seed):
    cu = cu_seqlens(lengths)
    fading = fading and window is not None
    T = int(cu[-1])
    rng = np.random.default_rng(seed)
    arrs = [rng.standard_normal((1, T, 2, 3)) for _ in range(5 if fading else 3)]
    g = rng.standard_normal((1, T, 2, 3))
    # the boundaries are traced: one compilation serves every packing of T tokens
    grad = jax.jit(jax.grad(_readout_loss(window, fading, g),
                            argnums=tuple(range(1, len(arrs) + 1)), has_aux=True))
    grads, o = grad(jnp.asarray(cu), *map(jnp.asarray, arrs))
    ta = [torch.tensor(a, requires_grad=True) for a in arrs]
    fk, fv = (ta[3], ta[4]) if fading else (None, None)
    want = ref_readout(*ta[:3], window, fk, fv, cu_seqlens=cu)
    record("pallas", "windowed_readout", rel_err(o, want.detach()))
    assert_close(np_(o), want.detach(), "o", RTOL)
    ref_grads = torch.autograd.grad((want * torch.from_numpy(g)).sum(), ta)
    for name, a, b in zip(("q", "k", "v", "fading_k", "fading_v"), grads, ref_grads,
                          strict=False):
        # relative RMSE, absolute where the true gradient is 0 (no fading key in reach)
        record("pallas", "windowed_readout grads (RMSE)", rel_rmse(a, b.numpy()))
        check(f"d/d{name}", a, b.numpy(), F64)
    twin = windowed_readout_ref(*map(jnp.asarray, arrs[:3]), window,
                                *map(jnp.asarray, arrs[3:]), cu_seqlens=jnp.asarray(cu))
    assert_close(np_(twin), want.detach(), "windowed_readout_ref", RTOL)


def test_windowed_readout_packing_matters_and_checks():
    """Two packings of one row under one trace give each its reference; a wrong call is
    refused naming cu_seqlens."""
    T, W = 20, 4
    rng = np.random.default_rng(3)
    q, k, v, fk, fv = (jnp.asarray(rng.standard_normal((1, T, 1, 4))) for _ in range(5))
    traces = []

    @jax.jit
    def run(cu):
        traces.append(1)
        return windowed_readout(q, k, v, W, fk, fv, cu_seqlens=cu, interpret=True)

    outs = []
    for lengths in ([3, 9, 8], [12, 1, 7]):
        cu = cu_seqlens(lengths)
        o = run(jnp.asarray(cu))
        assert_close(np_(o), ref_readout(*map(np_, (q, k, v)), W, np_(fk), np_(fv),
                                         cu_seqlens=cu), f"{lengths}", RTOL)
        outs.append(np_(o))
    assert len(traces) == 1
    assert rel_err(outs[0], outs[1]) > 1e-3
    cu = jnp.asarray(cu_seqlens([5, 15]))
    for kw, words in (
            (dict(pos=3), "pos=0"), (dict(key_start=1), "key_start=0"),
            (dict(store_k=jnp.zeros((1, 1, 2, 2, 4)), store_v=jnp.zeros((1, 1, 2, 2, 4)),
                  store_pos=jnp.zeros((1, 2, 2), jnp.int32), chunk=16), "without a store")):
        with pytest.raises(ValueError, match=f"cu_seqlens.*{words}"):
            windowed_readout(q, k, v, W, **kw, cu_seqlens=cu, interpret=True)
    with pytest.raises(ValueError, match="cu_seqlens.*Tk = Tq"):
        windowed_readout(q[:, 1:], k, v, W, cu_seqlens=jnp.asarray(cu_seqlens([5, 14])),
                         interpret=True)
    for bad, words in ((jnp.asarray([0, 5, 19], jnp.int32), "rise strictly from 0 to Tq=20"),
                       (jnp.asarray([0, 5, 5, 20], jnp.int32), "rise strictly"),
                       (jnp.asarray([0.0, 20.0]), "int32"),
                       (jnp.zeros((1, 3), jnp.int32), r"\[N \+ 1\]")):
        with pytest.raises(ValueError, match=f"cu_seqlens.*{words}"):
            windowed_readout(q, k, v, W, cu_seqlens=bad, interpret=True)


def test_kernels_keep_a_non_finite_value_in_its_document():
    """A NaN in document 1 (of 3): documents 0 and 2, and document 1 before it, read as in the
    clean row, forward and (scan) backward: the gradients of a loss on them are unchanged."""
    cu = cu_seqlens([5, 6, 7])
    T = 18
    keep = np.r_[0:8, 11:18]
    others = np.r_[0:5, 11:18]  # documents 0 and 2
    args = list(map(jnp.asarray, scan_args(T, 2, 2, False, 0)))
    w = np.zeros((1, 2, T))
    w[..., others] = np.random.default_rng(1).standard_normal((1, 2, len(others)))
    grad = jax.jit(jax.grad(_scan_loss(jnp.asarray(w), False), argnums=(1, 2), has_aux=True))
    (gu, gd), (y_clean, _) = grad(reset_of(cu, T), *args, None)
    bad = args[0].at[0, :, 8].set(math.nan)
    (gu_bad, gd_bad), (y, _) = grad(reset_of(cu, T), bad, *args[1:], None)
    assert np.all(np.isfinite(np_(y)[..., keep]))
    assert_close(np_(y)[..., keep], np_(y_clean)[..., keep], "scan: other positions", RTOL)
    assert np.all(np.isnan(np_(y)[..., 8:11]))
    for name, a, b in (("du", gu_bad, gu), ("ddelta", gd_bad, gd)):
        assert np.all(np.isfinite(np_(a)[..., others])), name
        assert_close(np_(a)[..., others], np_(b)[..., others], f"scan: {name}", RTOL)
    qkv = [jnp.asarray(np.random.default_rng(2).standard_normal((1, T, 1, 16)))
           for _ in range(3)]
    run = jax.jit(lambda *a: windowed_readout(*a, None, cu_seqlens=jnp.asarray(cu),
                                              interpret=True))
    clean = run(*qkv)
    o = run(qkv[0], qkv[1], qkv[2].at[0, 8].set(math.nan))
    assert np.all(np.isfinite(np_(o)[0, keep]))
    assert_close(np_(o)[0, keep], np_(clean)[0, keep], "readout: other positions", RTOL)
    assert np.all(np.isnan(np_(o)[0, 8:11]))


# --- the JAX backend on the kernels ------------------------------------------------------------

def test_backend_primitives_take_the_kernels_for_packed_rows(monkeypatch):
    """``implementation="pallas"`` with cu_seqlens runs the kernels (with the boundaries) and
    equals the reference, final states included; ``auto`` under MEMCORE_KERNELS=pallas
    resolves to them for a packed row."""
    monkeypatch.setenv("MEMCORE_KERNELS", "pallas")
    assert impl.resolve(jnp.zeros(3), packed=True) == "pallas"
    calls = []
    for name in ("selective_scan", "windowed_readout"):
        module = importlib.import_module(f"memcore.kernels.pallas.{name}")
        real = getattr(module, name)

        def spy(*a, _real=real, _name=name, **kw):
            bounds = kw.get("reset") if _name == "selective_scan" else kw.get("cu_seqlens")
            calls.append((_name, bounds is not None))
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, spy)
    cu = cu_seqlens([4, 1, 9])
    T = 14
    args = scan_args(T, 4, 2, True, 7)
    y, h = jax_scan(*map(jnp.asarray, args), delta_softplus=True, return_final_state=True,
                    cu_seqlens=jnp.asarray(cu), implementation="pallas")
    yr, hr = ref_scan(*args, delta_softplus=True, return_final_state=True, cu_seqlens=cu)
    assert_close(np_(y), yr, "selective_scan: y", RTOL)
    assert_close(np_(h), hr, "selective_scan: h_T", RTOL)
    rng = np.random.default_rng(8)
    q, k, v, fk, fv = (rng.standard_normal((1, T, 2, 3)) for _ in range(5))
    for window, fad in ((3, True), (None, False)):
        f = (fk, fv) if fad else (None, None)
        o, state = jax_readout(*map(jnp.asarray, (q, k, v)), window,
                               *(None if a is None else jnp.asarray(a) for a in f),
                               return_final_state=True, cu_seqlens=jnp.asarray(cu),
                               implementation="pallas")
        want, want_state = ref_readout(q, k, v, window, *f, return_final_state=True,
                                       cu_seqlens=cu)
        assert_close(np_(o), want, f"windowed_readout (window {window}): o", RTOL)
        assert_states_equal({a: (b if a == "pos" else np_(b)) for a, b in state.items()},
                            want_state, f"windowed_readout (window {window}): state", RTOL)
    assert calls == [("selective_scan", True), ("windowed_readout", True),
                     ("windowed_readout", True)]
    # what the kernel cannot serve is refused by name when asked for explicitly
    qb = jnp.asarray(q).swapaxes(1, 2)
    part = (jnp.zeros((1, 2, T)), jnp.ones((1, 2, T)), jnp.zeros((1, 2, T, 3)))
    with pytest.raises(ValueError, match="cannot run this call: .*store.*packed row"):
        packed_readout(qb, (qb, qb), None, 3, None, [part], cu=jnp.asarray(cu),
                       implementation="pallas")


LAYERS = {  # spec, pallas_call sites in the packed forward (kernels with the boundaries)
    "transformer_full": (memcore.spec.transformer(4, 2, window=None), 1),
    "transformer_windowed": (memcore.spec.transformer(4, 2, window=3), 1),
    "mamba": (memcore.spec.mamba(4, d_state=3), 1),
    "bmojo_f": (memcore.spec.bmojo_f(4, 2, window=2, d_state=2), 2),
    # the store's readout runs on JAX in a packed row; the fading block's scan on the kernel
    "bmojo": (memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2), 1),
}
PACKING = [4, 1, 3, 6]  # the last document the longest: its state is its unpadded run's


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_on_the_kernels(name, monkeypatch):
    """MEMCORE_KERNELS=pallas: the packed forward holds the kernels and equals the documents'
    separate forwards (each padded to the longest, one compiled shape: outputs are causal)
    and the reference's packed forward; the state is the last document's."""
    monkeypatch.setenv("MEMCORE_KERNELS", "pallas")
    spec, sites = LAYERS[name]
    params = params64(spec)
    layer = memcore.realize(spec, backend="jax", params=params)
    cu = cu_seqlens(PACKING)
    x = inputs(spec, 1, int(cu[-1]), seed=2)
    traced = jax.make_jaxpr(lambda a: layer.forward_aux(a, None, cu_seqlens=jnp.asarray(cu))[0])
    assert str(traced(jnp.asarray(x))).count("pallas_call[") == sites
    y, state, aux = layer.forward_aux(jnp.asarray(x), None, cu_seqlens=jnp.asarray(cu))
    longest = max(PACKING)
    docs = [np.pad(x[:, a:b], [(0, 0), (0, longest - (b - a)), (0, 0)])
            for a, b in zip(cu[:-1], cu[1:], strict=True)]
    sep = [layer.forward_aux(jnp.asarray(d), None) for d in docs]
    want = np.concatenate([np_(s[0])[:, :n] for s, n in zip(sep, PACKING, strict=True)], axis=1)
    record("pallas", name, rel_err(y, want))
    assert_close(np_(y), want, f"{name}: packed vs separate", RTOL)
    assert_states_equal(layer.to_reference_state(state), layer.to_reference_state(sep[-1][1]),
                        f"{name}: final state", RTOL)
    ref = L.forward_aux(spec, params, x, None, cu)
    assert_close(np_(y), ref[0], f"{name}: against the reference", RTOL)
    assert (aux is None) == (ref[2] is None)
    if aux is not None:  # the token mean over the row, as the reference's
        assert abs(float(aux) - float(ref[2])) <= RTOL * max(1.0, abs(float(ref[2])))


def test_layer_gradients_on_the_kernels(monkeypatch):
    """bmojo_f's packed forward on both kernels (the scan's and the readout's backward
    kernels): d/dx against the reference's."""
    monkeypatch.setenv("MEMCORE_KERNELS", "pallas")
    spec = LAYERS["bmojo_f"][0]
    params = params64(spec)
    layer = memcore.realize(spec, backend="jax", params=params)
    cu = cu_seqlens(AWKWARD[1])
    x = inputs(spec, 1, int(cu[-1]), seed=3)
    w = np.random.default_rng(1).standard_normal(x.shape)
    gx = jax.grad(lambda a: jnp.sum(layer(a, cu_seqlens=jnp.asarray(cu))[0] * w))(jnp.asarray(x))
    xt = torch.tensor(x, requires_grad=True)
    yr, _, _ = L.forward_aux(spec, params, xt, None, cu)
    (gr,) = torch.autograd.grad((yr * torch.from_numpy(w)).sum(), xt)
    record("pallas", "bmojo_f d/dx", rel_err(gx, gr))
    assert_close(np_(gx), gr, "bmojo_f: d/dx", RTOL)


# --- built for a GPU ---------------------------------------------------------------------------

# the lowering tests' fixtures: skip, naming the missing piece, where the toolchain cannot
cuda_lowering = lowering.cuda_lowering
triton_cuda = lowering.triton_cuda


def test_packed_kernels_build_for_sm90(triton_cuda, tmp_path):
    """No GPU needed (tests/kernels/test_pallas_lowering.py): the kernels with their reset
    flags and traced document starts lower for CUDA and build to sm_90 cubins within one
    block's shared memory, forward and backward, dots at least 16 on every side."""
    T = 37
    args = [jnp.asarray(a, jnp.float32) for a in scan_args(T, 40, 5, True, 0)]
    cu = jnp.asarray(cu_seqlens([5, 20, 12]))

    def scan(reset, *a):
        y, h = selective_scan(*a, delta_softplus=True, return_final_state=True, reset=reset)
        return jnp.sum(y) + jnp.sum(h)

    modules = lowering.lower_to_ttir(jax.grad(scan, argnums=tuple(range(1, 9))),
                                     reset_of(np_(cu), T), *args)
    (tmp_path / "scan").mkdir()
    lowering.check_modules(modules, 2, triton_cuda, tmp_path / "scan")  # forward, backward
    q, k, v, fk, fv = (jnp.zeros((1, T, 2, 5), jnp.float32) for _ in range(5))

    def attention(cu, *a):
        return jnp.sum(windowed_readout(*a[:3], 6, *a[3:], cu_seqlens=cu, block=16))

    modules = lowering.lower_to_ttir(jax.grad(attention, argnums=tuple(range(1, 6))), cu, q, k,
                                     v, fk, fv)
    (tmp_path / "readout").mkdir()
    lowering.check_modules(modules, 4, triton_cuda, tmp_path / "readout")  # fwd, dq, 2 dk/dv
