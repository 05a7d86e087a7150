"""The Pallas windowed-readout kernel (raw + fading windows, store) against
``memcore.spec.reference.windowed_readout`` on JAX arrays: forward and gradients,
interpreted on the CPU on small awkward shapes, compiled on a GPU at a realistic size. Every
kernel call gets a NaN-filled output buffer (``poison=True``)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
from memcore.kernels.pallas.windowed_readout import windowed_readout  # noqa: E402
from memcore.spec.reference.numerics import namespace  # noqa: E402
from memcore.spec.reference.windowed_readout import fading_mask, raw_mask, readout  # noqa: E402
from memcore.spec.reference.windowed_readout import windowed_readout as reference  # noqa: E402
from pallascheck import check, gpu, rel_rmse  # noqa: E402


def run(fn, q, k, v, window, fk, fv, **kw):
    """The call compiled: one compilation costs less than the interpreter's eager ops."""
    return jax.jit(lambda *a: fn(*a[:3], window, *a[3:], **kw))(q, k, v, fk, fv)


def qkv(B, T, H, E, fading, dtype, seed=0):
    r = np.random.default_rng(seed)
    arrs = [jnp.asarray(r.standard_normal((B, T, H, E)), dtype) for _ in range(5)]
    return arrs if fading else arrs[:3] + [None, None]


# (B, T, H, E, window, fading): T not a multiple of the tile; T = 1; T < W; odd head width;
# full causal attention (window None); window of one token
CASES = [(2, 37, 2, 5, 6, True), (1, 1, 1, 4, 3, True), (1, 9, 2, 3, 20, True),
         (1, 20, 1, 3, None, False), (1, 23, 1, 4, 1, False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_float64(case):
    *shape, window, fading = case
    q, k, v, fk, fv = qkv(*shape, fading, jnp.float64)
    o = run(windowed_readout, q, k, v, window, fk, fv, interpret=True, poison=True)
    assert o.dtype == jnp.float64
    check("o", o, run(reference, q, k, v, window, fk, fv), jnp.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_forward_low_precision(dtype):
    q, k, v, fk, fv = qkv(1, 26, 2, 6, True, dtype, seed=1)
    o = run(windowed_readout, q, k, v, 5, fk, fv, interpret=True, poison=True)
    assert o.dtype == dtype
    check("o", o, run(reference, q, k, v, 5, fk, fv), dtype)


def test_key_tiles_outside_the_window_are_never_read():
    # 16 queries after a cache of 48 keys, window 4: they see keys 45..63 (tiles 2 and 3 of 16),
    # so NaN in tiles 0 and 1 must not reach the output
    r = np.random.default_rng(2)
    q = jnp.asarray(r.standard_normal((1, 16, 1, 4)))
    k, v = (jnp.asarray(r.standard_normal((1, 64, 1, 4))) for _ in range(2))
    o = windowed_readout(q, k.at[:, :32].set(jnp.nan), v.at[:, :32].set(jnp.nan), 4,
                        interpret=True, poison=True, block=16)
    # the reference over the whole sequence, read at the last 16 positions
    q_all = jnp.concatenate([jnp.zeros((1, 48, 1, 4)), q], axis=1)
    want = reference(q_all, k, v, 4)[:, 48:]
    check("o", o, want, jnp.float64)


@pytest.mark.parametrize("case", [(1, 21, 2, 3, 4, True), (1, 12, 1, 5, None, False)],
                         ids=lambda c: "x".join(map(str, c)))
def test_gradients(case):
    *shape, window, fading = case
    q, k, v, fk, fv = qkv(*shape, fading, jnp.float64, seed=3)
    g = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape))
    args = (q, k, v, fk, fv) if fading else (q, k, v)
    names = ("q", "k", "v", "fading_k", "fading_v")[:len(args)]

    def loss(fn, **kw):
        return lambda *a: jnp.sum(fn(*a[:3], window, *a[3:], **kw) * g)

    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss(windowed_readout, interpret=True, poison=True), argnums))(*args)
    want = jax.jit(jax.grad(loss(reference), argnums))(*args)
    for name, a, b in zip(names, got, want, strict=True):
        check(f"d{name}", a, b, jnp.float64)


def store_case(B, T, H, E, W, C, M, pos, empty, seed):
    """Queries at pos .. pos + T - 1 with their own raw and fading keys, and one store
    snapshot per chunk they fall in; a snapshot serving chunk c holds positions before c C."""
    r = np.random.default_rng(seed)
    q, k, v, fk, fv = qkv(B, T, H, E, True, jnp.float64, seed)
    S = (pos + T - 1) // C - pos // C + 1
    first = pos // C + np.arange(S)  # chunk served by each snapshot
    spos = r.integers(-1, np.maximum(first * C, 1)[None, :, None], size=(B, S, M))
    spos = np.where(first[None, :, None] * C > 0, spos, -1)  # nothing precedes chunk 0
    if empty:
        spos = np.full_like(spos, -1)
    sk, sv = (jnp.asarray(r.standard_normal((B, H, S, M, E))) for _ in range(2))
    return (q, k, v, fk, fv, sk, sv), jnp.asarray(spos)


def store_oracle(q, k, v, fk, fv, sk, sv, spos, W, C, pos):
    """The spec's readout over three sources: raw and fading masks from the reference and the
    store mask of DESIGN 2.4 written out."""
    xp = namespace(q)
    B, T, H, E = q.shape
    S, M = spos.shape[1], spos.shape[2]
    qpos = pos + jnp.arange(T)

    def bhte(a):
        return jnp.swapaxes(a, 1, 2)

    snap = qpos // C - pos // C  # [T]
    slot_snap = jnp.repeat(jnp.arange(S), M)  # [S M]
    sp = spos.reshape(B, S * M)
    smask = ((snap[:, None] == slot_snap[None, :])[None]
             & (sp[:, None, :] >= 0) & (sp[:, None, :] <= qpos[None, :, None] - W))
    sources = [(bhte(k), bhte(v), raw_mask(qpos, qpos, W)[None, None]),
               (bhte(fk), bhte(fv), fading_mask(qpos, qpos, W)[None, None]),
               (sk.reshape(B, H, S * M, E), sv.reshape(B, H, S * M, E), smask[:, None])]
    return bhte(readout(xp, bhte(q), sources))


# (B, T, H, E, W, chunk, M, pos, empty): entries over several chunks; queries starting
# mid-stream; T below the chunk; an empty store
STORE_CASES = [(1, 23, 2, 3, 4, 5, 3, 0, False), (2, 13, 1, 4, 3, 4, 2, 6, False),
               (1, 3, 1, 4, 2, 8, 2, 9, False), (1, 9, 1, 3, 2, 4, 2, 0, True)]


@pytest.mark.parametrize("case", STORE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_store_source(case):
    *shape, W, C, M, pos, empty = case
    arrs, spos = store_case(*shape, W, C, M, pos, empty, seed=7)
    q, k, v, fk, fv, sk, sv = arrs
    o = jax.jit(lambda *a: windowed_readout(*a[:3], W, *a[3:], spos, C, pos, interpret=True,
                                           poison=True))(*arrs)
    check("o", o, store_oracle(*arrs, spos, W, C, pos), jnp.float64)
    if not empty:  # the case must exercise the store: without it the result differs
        assert rel_rmse(o, store_oracle(*arrs, spos * 0 - 1, W, C, pos)) > 1e-3


def test_store_gradients():
    W, C, pos = 3, 4, 2
    arrs, spos = store_case(1, 14, 2, 3, W, C, 3, pos, False, seed=8)
    g = jnp.asarray(np.random.default_rng(9).standard_normal(arrs[0].shape))
    argnums = tuple(range(len(arrs)))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(g * windowed_readout(
        *a[:3], W, *a[3:], spos, C, pos, interpret=True, poison=True)), argnums))(*arrs)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(g * store_oracle(*a, spos, W, C, pos)),
                            argnums))(*arrs)
    for name, a, b in zip(("q", "k", "v", "fading_k", "fading_v", "store_k", "store_v"), got,
                          want, strict=True):
        check(f"d{name}", a, b, jnp.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_gradients_low_precision(dtype):
    q, k, v, fk, fv = qkv(1, 19, 2, 6, True, dtype, seed=16)
    g = jnp.asarray(np.random.default_rng(17).standard_normal(q.shape), jnp.float32)

    def loss(fn, **kw):
        return lambda *a: jnp.sum(fn(*a[:3], 4, *a[3:], **kw).astype(jnp.float32) * g)

    argnums = tuple(range(5))
    got = jax.jit(jax.grad(loss(windowed_readout, interpret=True, poison=True), argnums))(
        q, k, v, fk, fv)
    want = jax.jit(jax.grad(loss(reference), argnums))(q, k, v, fk, fv)
    for name, a, b in zip(("q", "k", "v", "fading_k", "fading_v"), got, want, strict=True):
        assert a.dtype == dtype, name
        check(f"d{name}", a, b, dtype)


def test_gradients_after_a_key_cache():
    # 11 queries after 19 cached keys: gradients equal the reference's over the whole sequence
    # with the loss on the last 11 outputs only
    W, n, Tq = 5, 30, 11
    q, k, v, fk, fv = qkv(1, n, 2, 3, True, jnp.float64, seed=10)
    q = q[:, n - Tq:]
    g = jnp.asarray(np.random.default_rng(11).standard_normal(q.shape))
    argnums = tuple(range(5))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(g * windowed_readout(
        *a[:3], W, *a[3:], interpret=True, poison=True)), argnums))(q, k, v, fk, fv)

    def full(q, *kv):
        q_all = jnp.concatenate([jnp.zeros((1, n - Tq, 2, 3)), q], axis=1)
        return jnp.sum(g * reference(q_all, *kv[:2], W, *kv[2:])[:, n - Tq:])

    want = jax.jit(jax.grad(full, argnums))(q, k, v, fk, fv)
    for name, a, b in zip(("q", "k", "v", "fading_k", "fading_v"), got, want, strict=True):
        check(f"d{name}", a, b, jnp.float64)


def test_bad_input_names_argument():
    q, k, v, _, _ = qkv(1, 4, 1, 4, False, jnp.float32)
    with pytest.raises(ValueError, match="v must have"):
        windowed_readout(q, k, v[..., :3], 2, interpret=True)
    with pytest.raises(ValueError, match="window must be"):
        windowed_readout(q, k, v, None, k, v, interpret=True)
    with pytest.raises(ValueError, match="store_pos must be"):
        windowed_readout(q, k, v, 2, store_k=jnp.zeros((1, 1, 1, 2, 4)),
                        store_v=jnp.zeros((1, 1, 1, 2, 4)), store_pos=jnp.zeros((1, 1, 2), int),
                        chunk=2, interpret=True)


@gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_compiled_realistic(dtype):
    q, k, v, fk, fv = qkv(2, 1000, 4, 64, True, dtype, seed=5)
    o = windowed_readout(q, k, v, 128, fk, fv, poison=True, block=64)
    check("o", o, reference(q, k, v, 128, fk, fv), dtype)

    def loss(fn, **kw):
        return lambda q: jnp.sum(fn(q, k, v, 128, fk, fv, **kw).astype(jnp.float32))

    check("dq", jax.grad(loss(windowed_readout, block=64))(q), jax.grad(loss(reference))(q), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_lowers_to_triton_for_gpu(dtype):
    # Lowering for CUDA needs no GPU: it checks that the kernel is one the GPU lowering accepts
    # (power-of-two tiles, supported primitives) before any GPU sees it.
    q, k, v, fk, fv = qkv(1, 37, 2, 5, True, dtype, seed=6)
    sk = jnp.zeros((1, 2, 5, 3, 5), dtype)
    spos = jnp.zeros((1, 5, 3), jnp.int32)
    f = jax.jit(lambda q: windowed_readout(q, k, v, 6, fk, fv, sk, sk, spos, 8, block=16))
    text = f.trace(q).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    # the backward kernels (no store): dq, then dk/dv for each of the two sources
    f = jax.jit(jax.grad(lambda q: jnp.sum(windowed_readout(q, k, v, 6, fk, fv, block=16)
                                           .astype(jnp.float32))))
    text = f.trace(q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 4


@pytest.mark.parametrize("store", [False, True], ids=["windows", "store"])
def test_traced_pos_and_key_start(store):
    # A fixed-length cache whose first key_start entries are not filled yet (the JAX backend's
    # rings early in a stream): with pos and key_start traced, the result and gradients equal
    # those of the cache cut to its filled part with a static pos.
    W, C, pos, cache, start = 3, 4, 2, 6, 4  # keys 0..3 sit before position 0
    (q, k, v, fk, fv, sk, sv), spos = store_case(1, 9, 2, 3, W, C, 2, pos, False, seed=12)
    r = np.random.default_rng(13)
    k, v, fk, fv = (jnp.concatenate([jnp.asarray(r.standard_normal((1, cache, 2, 3))), a], 1)
                    for a in (k, v, fk, fv))
    st = (sk, sv, spos, C) if store else ()
    g = jnp.asarray(r.standard_normal(q.shape))

    def traced(q, k, v, fk, fv, p, s):
        return jnp.sum(g * windowed_readout(q, k, v, W, fk, fv, *st, pos=p, key_start=s,
                                           interpret=True, poison=True))

    def cut(q, k, v, fk, fv):
        k, v, fk, fv = (a[:, start:] for a in (k, v, fk, fv))
        return jnp.sum(g * windowed_readout(q, k, v, W, fk, fv, *st, pos=pos, interpret=True))

    args = (q, k, v, fk, fv)
    p, s = jnp.int32(pos), jnp.int32(start)
    got = jax.jit(jax.value_and_grad(traced, tuple(range(5))))(*args, p, s)
    want = jax.jit(jax.value_and_grad(cut, tuple(range(5))))(*args)
    check("loss", got[0], want[0], jnp.float64)
    for name, a, b in zip(("q", "k", "v", "fading_k", "fading_v"), got[1], want[1], strict=True):
        check(f"d{name}", a, b, jnp.float64)
    # the unfilled keys matter when not masked: the check above can fail
    loose = jax.jit(traced)(*args, p, jnp.int32(0))
    assert abs(float(loose - want[0])) > 1e-3 * abs(float(want[0]))
