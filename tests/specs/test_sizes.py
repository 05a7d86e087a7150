"""``memcore.spec.sizes``: the byte counts equal what ``init`` and ``init_state`` allocate (the
sum of the arrays' nbytes) in the reference, torch and JAX, and the allocation limit is checked
before anything is allocated, naming the argument responsible."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import refcheck
import torch
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec import sizes
from torchcheck import LAYER_CASES

import memcore
from memcore import spec as S

SPECS = dict(LAYER_CASES)
SPECS.update({
    "model_persistent_ffn": S.model([S.mamba(6, d_state=3), S.bmojo(6, 2, window=3, chunk=4,
                                                                   select=2, capacity=3)],
                                    11, ffn="persistent"),
    "model_mlp": S.model([S.transformer(6, 2), S.mosaic(6, 3)], 7, mlp_ratio=3, norm="layer"),
    "model_no_ffn": S.model([S.mamba(4, dt_rank=3)], 5, ffn=None),
    "jamba": S.jamba(8, 2, n_layers=5, window=3),
})


def nbytes(tree) -> int:
    """The bytes of every array of a state (dicts, tuples; ``pos`` and ``spec_id`` left out)."""
    if isinstance(tree, dict):
        return sum(nbytes(v) for k, v in tree.items() if k not in ("pos", "spec_id"))
    if isinstance(tree, (tuple, list)):
        return sum(nbytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    return int(tree.nbytes)


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(sizes.ENV, raising=False)
    sizes.set_allocation_limit(None)
    yield
    sizes.set_allocation_limit(None)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_param_bytes_equal_init(name, dtype):
    spec = SPECS[name]
    params = memcore.init(spec, 0, dtype)
    assert sizes.param_bytes(spec, np.dtype(dtype).itemsize) == sum(
        a.nbytes for a in params.values())


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("backend,index_bytes", [("reference", 8), ("torch", 8), ("jax", 4)])
def test_state_bytes_equal_init_state(name, backend, index_bytes):
    spec = SPECS[name]
    layer = memcore.realize(spec, backend=backend, params=memcore.init(spec, 0, np.float32))
    for batch, dtype, width in ((1, "float32", 4), (3, "float64", 8)):
        if backend == "jax":  # growing caches get max_len slots
            state = layer.init_state(batch, dtype=getattr(jnp, dtype), max_len=5).arrays
            want = sizes.state_bytes(spec, batch, 5, width, index_bytes)
        else:
            dt = getattr(torch, dtype) if backend == "torch" else dtype
            state = layer.init_state(batch, dtype=dt)
            want = sizes.state_bytes(spec, batch, None, width, index_bytes)
        assert nbytes(state) == want, (batch, dtype)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_growing_caches_hold_max_len_slots(backend):
    """After T tokens a KV cache holds T slots; an unbounded associative memory T - 1 pairs."""
    for spec, held in ((S.transformer(6, 2), 7), (S.mosaic(6, 2), 6)):
        layer = memcore.realize(spec, backend=backend, params=memcore.init(spec, 0, np.float64))
        x = np.zeros((2, 7, 6))
        _, state = layer(torch.from_numpy(x) if backend == "torch" else x)
        assert nbytes(state) == sizes.state_bytes(spec, 2, held, 8)


@given(spec=st.one_of(refcheck.transformer_specs(), refcheck.mamba_specs(),
                      refcheck.bmojo_f_specs(), refcheck.bmojo_specs(), refcheck.mosaic_specs(),
                      refcheck.persistent_specs(), refcheck.model_specs()),
       batch=st.integers(1, 3))
def test_drawn_specs(spec, batch):
    params = memcore.init(spec, 0, np.float64)
    assert sizes.param_bytes(spec, 8) == sum(a.nbytes for a in params.values())
    state = memcore.realize(spec, params=params).init_state(batch)
    assert nbytes(state) == sizes.state_bytes(spec, batch, None, 8)


def test_the_message_names_the_largest_contributor():
    spec = S.transformer(32, 2, window=10**12)
    want = 2 * 2 * 10**12 * 16 * 4  # k and v rings: 2 x heads x window x head_dim x 4 bytes
    assert sizes.state_bytes(spec) == want
    with pytest.raises(ValueError, match=rf"transformer: window=1000000000000 asks for a state "
                                         rf"of 232.8 TiB \({want} bytes, batch 1\), beyond the "
                                         rf"allocation limit of 16.0 GiB; raise it with "
                                         rf"memcore.set_allocation_limit\(...\) or "
                                         rf"MEMCORE_MAX_ALLOC_BYTES"):
        sizes.check_allocation(spec)
    with pytest.raises(ValueError, match=r"mamba: d_state=1099511627776 asks for parameters"):
        sizes.check_allocation(S.mamba(32, d_state=2**40), what="params")
    with pytest.raises(ValueError, match=r"batch=100000000 asks for a state"):
        sizes.check_allocation(S.mamba(32), batch=10**8)
    sizes.check_allocation(S.transformer(32, 2, window=10**12), what="params")  # 16 KiB


def test_limit_from_setter_and_environment(monkeypatch):
    spec = S.transformer(8, 2)  # parameters: 4 * 8 * 8 * 4 = 1024 bytes
    assert sizes.param_bytes(spec) == 1024
    sizes.set_allocation_limit(1023)
    assert memcore.allocation_limit() == 1023
    with pytest.raises(ValueError, match=r"d_model=8 asks for parameters of 1.0 KiB \(1024 "
                                         r"bytes\), beyond the allocation limit of 1023 bytes"):
        memcore.init(spec)
    memcore.set_allocation_limit(1024)
    memcore.init(spec)
    memcore.set_allocation_limit(None)
    monkeypatch.setenv("MEMCORE_MAX_ALLOC_BYTES", "1000")
    with pytest.raises(ValueError, match=r"beyond the allocation limit of 1000 bytes"):
        memcore.init(spec)
    monkeypatch.setenv("MEMCORE_MAX_ALLOC_BYTES", "lots")
    with pytest.raises(ValueError, match=r"MEMCORE_MAX_ALLOC_BYTES must be a positive integer"):
        memcore.init(spec)
    monkeypatch.setenv("MEMCORE_MAX_ALLOC_BYTES", "0")
    with pytest.raises(ValueError, match=r"MEMCORE_MAX_ALLOC_BYTES must be a positive integer"):
        memcore.init(spec)
    memcore.set_allocation_limit(2**20)  # the setter wins over the environment
    memcore.init(spec)


@pytest.mark.parametrize("backend", ["reference", "torch", "jax"])
def test_every_state_allocation_is_checked(backend):
    spec = S.transformer(8, 2)
    layer = memcore.realize(spec, backend=backend)
    per_token = sizes.state_bytes(spec, 1, 1)  # k and v of one token: 2 * 8 * 4 bytes
    memcore.set_allocation_limit(10 * per_token)
    f32 = {"dtype": jnp.float32} if backend == "jax" else {}  # JAX's default float is float64
    layer.init_state(1, max_len=10, **f32)
    with pytest.raises(ValueError, match=r"max_len=11 asks for a state"):
        layer.init_state(1, max_len=11, **f32)
    with pytest.raises(ValueError, match=r"batch=11 asks for a state"):
        layer.init_state(11, max_len=1, **f32)
    # a growing cache is checked before it grows: on a call without a state, and on a call
    # that would grow a given one past the limit
    xs = np.zeros((1, 11, 8), np.float32)
    xs = torch.from_numpy(xs) if backend == "torch" else xs
    with pytest.raises(ValueError, match=r"max_len=11 asks for a state"):
        layer(xs)
    _, state = layer(xs[:, :6])
    with pytest.raises(ValueError, match=r"max_len=1[12] asks for a state"):
        layer(xs[:, :5], state)


def test_realize_checks_the_state_of_one_sequence():
    memcore.set_allocation_limit(2**20)
    spec = S.bmojo_f(8, 2, window=2**16, d_state=2)  # rings: 6 * 2**16 * 8 * 4 bytes
    for backend in ("reference", "torch", "jax"):
        with pytest.raises(ValueError, match=r"bmojo_f: window=65536 asks for a state"):
            memcore.realize(spec, backend=backend)


def test_argument_checks():
    spec = S.mamba(4)
    with pytest.raises(ValueError, match=r"what must be one of \('state', 'params', 'both'\)"):
        sizes.check_allocation(spec, what="all")
    with pytest.raises(ValueError, match=r"check_allocation: batch must be >= 1, got 0"):
        sizes.check_allocation(spec, batch=0)
    with pytest.raises(TypeError, match=r"check_allocation: max_len must be an int or None"):
        sizes.check_allocation(spec, max_len=2.5)
    with pytest.raises(TypeError, match=r"spec must be a memcore layer or model spec"):
        sizes.param_bytes(spec.scan)
    with pytest.raises(ValueError, match=r"set_allocation_limit: limit must be >= 1, got 0"):
        memcore.set_allocation_limit(0)
    with pytest.raises(TypeError, match=r"limit must be an int or None, got '16G'"):
        memcore.set_allocation_limit("16G")
    with pytest.raises(ValueError, match=r"state_bytes: dtype_bytes must be >= 1"):
        sizes.state_bytes(spec, dtype_bytes=0)


def test_chunk_layout_of_the_parallel_forms():
    spec = S.bmojo(8, 2, 2, chunk=4, select=1, capacity=2, d_state=2)
    # tokens 3 .. 7 touch chunks 0 and 1: 8 slots of k, v (2 x 8 floats), a score and a position
    assert sizes.layout_bytes(spec, 2, 5, pos=3) == 2 * 8 * ((2 * 8 + 1) * 4 + 8)
    assert sizes.layout_bytes(spec, 2, 0, pos=3) == 0
    assert sizes.layout_bytes(S.bmojo_f(8, 2, 2), 2, 5) == 0
    model = S.model([S.mamba(8), spec, S.bmojo(8, 2, 2, chunk=16, select=1, capacity=2)], 5)
    assert sizes.layout_bytes(model, 1, 3) == 16 * ((2 * 8 + 1) * 4 + 8)
    memcore.set_allocation_limit(16 * ((2 * 8 + 1) * 4 + 8) - 1)
    with pytest.raises(ValueError, match=r"model: layers\[2\].chunk=16 asks for a chunk layout"):
        sizes.check_layout(model, batch=1, T=3)
    sizes.check_layout(spec, batch=1, T=3)
