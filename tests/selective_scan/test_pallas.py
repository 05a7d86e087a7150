"""Pallas selective scan against the reference (DESIGN 2.1) on JAX arrays: forward, final state
and gradients, interpreted on the CPU on small awkward shapes, compiled on a GPU at a realistic
size. Every kernel call gets NaN-filled output buffers (``poison=True``)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
from memcore.kernels.pallas.selective_scan import selective_scan  # noqa: E402
from memcore.spec.reference.selective_scan import selective_scan as reference  # noqa: E402
from pallascheck import check, gpu  # noqa: E402


def run(fn, x, **kw):
    """fn(**x, **kw) compiled: one compilation costs less than the interpreter's eager ops."""
    return jax.jit(lambda x: fn(**x, **kw))(x)


def inputs(Bt, Dc, T, N, G, dtype, seed=0, with_z=True):
    r = np.random.default_rng(seed)

    def f(*s, scale=1.0):
        return jnp.asarray(scale * r.standard_normal(s), dtype)

    bc = (Bt, N, T) if G is None else (Bt, G, N, T)
    return dict(
        u=f(Bt, Dc, T), delta=f(Bt, Dc, T, scale=0.5),
        A=jnp.asarray(-np.exp(r.standard_normal((Dc, N))), jnp.float32 if dtype != jnp.float64
                      else dtype),
        B=f(*bc), C=f(*bc), D=f(Dc), z=f(Bt, Dc, T) if with_z else None, delta_bias=f(Dc),
        initial_state=jnp.asarray(r.standard_normal((Bt, Dc, N)),
                                  jnp.float64 if dtype == jnp.float64 else jnp.float32),
    )


def grads_both(x, objective, **kw):
    """Gradients of objective(kernel(**x, **kw)) and of objective(reference(**x, **kw)) to
    every input in x, each jitted: (name, kernel's, reference's) per input."""
    names = list(x)

    def loss(fn, **extra):
        def f(*args):
            return objective(fn(**dict(zip(names, args, strict=True)), **kw, **extra))
        return f

    argnums = tuple(range(len(names)))
    got = jax.jit(jax.grad(loss(selective_scan, interpret=True, poison=True), argnums))(
        *x.values())
    want = jax.jit(jax.grad(loss(reference), argnums))(*x.values())
    return list(zip(names, got, want, strict=True))


# T = 1; T not a multiple of the chunk; odd channel and state widths; grouped B/C; more
# channels than one program holds
SHAPES = [(1, 3, 1, 1, None), (2, 5, 37, 3, None), (1, 6, 20, 5, 3), (1, 40, 9, 2, None)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_float64(shape):
    x = inputs(*shape, jnp.float64)
    y, h = run(selective_scan, x, delta_softplus=True, return_final_state=True,
               interpret=True, poison=True)
    y0, h0 = run(reference, x, delta_softplus=True, return_final_state=True)
    assert y.dtype == jnp.float64 and h.dtype == jnp.float64
    check("y", y, y0, jnp.float64)
    check("final state", h, h0, jnp.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_forward_low_precision(dtype):
    x = inputs(2, 7, 19, 4, None, dtype, seed=1)
    y, h = run(selective_scan, x, delta_softplus=True, return_final_state=True,
               interpret=True, poison=True)
    y0, h0 = run(reference, x, delta_softplus=True, return_final_state=True)
    assert y.dtype == dtype and h.dtype == jnp.float32
    check("y", y, y0, dtype)
    check("final state", h, h0, dtype)


def test_optional_inputs_absent():
    x = inputs(1, 4, 11, 3, None, jnp.float64, seed=2, with_z=False)
    # without softplus a negative step would grow the state exponentially
    x.update(D=None, delta_bias=None, initial_state=None, delta=jnp.abs(x["delta"]))
    check("y", run(selective_scan, x, interpret=True, poison=True), run(reference, x),
          jnp.float64)


@pytest.mark.parametrize("shape", [(1, 3, 1, 2, None), (2, 6, 21, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradients(shape):
    x = inputs(*shape, jnp.float64, seed=3)
    r = np.random.default_rng(4)
    gy = jnp.asarray(r.standard_normal(x["u"].shape))
    gh = jnp.asarray(r.standard_normal(x["initial_state"].shape))
    for name, g, w in grads_both(x, lambda out: jnp.sum(out[0] * gy) + jnp.sum(out[1] * gh),
                                 delta_softplus=True, return_final_state=True):
        check(f"d{name}", g, w, jnp.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_gradients_low_precision(dtype):
    x = inputs(1, 5, 19, 3, None, dtype, seed=14)
    gy = jnp.asarray(np.random.default_rng(15).standard_normal(x["u"].shape), jnp.float32)
    for name, g, w in grads_both(x, lambda y: jnp.sum(y.astype(jnp.float32) * gy),
                                 delta_softplus=True):
        assert g.dtype == w.dtype, name
        check(f"d{name}", g, w, dtype)


def test_gradients_optional_inputs_absent():
    # no z, D or delta_bias, no softplus; channels over two programs (partial sums of dB, dC)
    x = inputs(1, 40, 17, 2, None, jnp.float64, seed=12, with_z=False)
    x.update(D=None, delta_bias=None, delta=jnp.abs(x["delta"]))
    del x["z"], x["D"], x["delta_bias"]
    r = np.random.default_rng(13)
    gy = jnp.asarray(r.standard_normal(x["u"].shape))
    gh = jnp.asarray(r.standard_normal(x["initial_state"].shape))
    for name, g, w in grads_both(x, lambda out: jnp.sum(out[0] * gy) + jnp.sum(out[1] * gh),
                                 return_final_state=True):
        check(f"d{name}", g, w, jnp.float64)


def test_bad_input_names_argument():
    x = inputs(1, 4, 5, 3, None, jnp.float32)
    x["A"] = x["A"][:3]
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**x, interpret=True)


@gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_compiled_realistic(dtype):
    x = inputs(2, 256, 1000, 16, None, dtype, seed=5)
    y, h = selective_scan(**x, delta_softplus=True, return_final_state=True, poison=True)
    y0, h0 = reference(**x, delta_softplus=True, return_final_state=True)
    check("y", y, y0, dtype)
    check("final state", h, h0, dtype)
    g = jax.grad(lambda u: jnp.sum(selective_scan(**{**x, "u": u}).astype(jnp.float32)))(x["u"])
    g0 = jax.grad(lambda u: jnp.sum(reference(**{**x, "u": u}).astype(jnp.float32)))(x["u"])
    check("du", g, g0, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_lowers_to_triton_for_gpu(dtype):
    # Lowering for CUDA needs no GPU: it checks that the kernel is one the GPU lowering accepts
    # (power-of-two tiles, supported primitives) before any GPU sees it.
    x = inputs(2, 5, 37, 3, 1, dtype, seed=6)
    f = jax.jit(lambda x: selective_scan(**x, delta_softplus=True, return_final_state=True))
    text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    # forward and the reverse-time backward kernel
    f = jax.jit(jax.grad(lambda u: jnp.sum(selective_scan(**{**x, "u": u}).astype(jnp.float32))))
    text = f.trace(x["u"]).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
