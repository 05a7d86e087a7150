"""The Triton windowed readout against the reference: raw and fading windows against
``memcore.spec.reference.windowed_readout``, the store through the bmojo layer against the
reference layer,
and every source together against the plain-torch ``windowed_readout_ref``; forward and
gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton")

from kcheck import DEVICE, assert_close, assert_grads_close, gpu  # noqa: E402
from memcore.kernels.triton.windowed_readout import (  # noqa: E402
    windowed_readout,
    windowed_readout_ref,
)
from primitives import REF as ops  # noqa: E402

F64 = torch.float64

import memcore  # noqa: E402


def rand(shape, dtype, device, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(
        device=device, dtype=dtype).requires_grad_()


def qkv(B, T, H, E, dtype, device, fading, seed=0, Tk=None):
    g = torch.Generator().manual_seed(seed)
    Tk = T if Tk is None else Tk
    out = {"q": rand((B, T, H, E), dtype, device, g)}
    for name in ("k", "v") + (("fading_k", "fading_v") if fading else ()):
        out[name] = rand((B, Tk, H, E), dtype, device, g)
    return out


def compare(got_out, want_out, inputs, dtype, seed=1):
    assert got_out.dtype == inputs["q"].dtype
    assert_close("o", got_out, want_out, dtype)
    assert_grads_close((got_out,), (want_out,), inputs, dtype, seed)


# (B, T, H, E, W): T off the 16-row tile, T < W, T = 1, odd head widths, W = 1,
# and W = None (full causal attention, raw keys only)
SHAPES = [(2, 21, 2, 5, 6), (1, 5, 1, 3, 8), (1, 1, 2, 4, 3), (1, 37, 1, 17, 1),
          (2, 19, 1, 6, None)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}E{}W{}".format(*s))
def test_windows_float64_vs_reference_op(shape, device):
    B, T, H, E, W = shape
    fading = W is not None
    inp = qkv(B, T, H, E, torch.float64, device, fading)
    got = windowed_readout(window=W, **inp)
    want = ops.windowed_readout(window=W, **inp)
    compare(got, want, inp, torch.float64)


def test_key_cache_before_the_queries(device):
    """Queries for the tail of a sequence with the keys of the whole sequence (a prefill after
    a cache) equal the tail of one pass."""
    inp = qkv(1, 23, 2, 5, torch.float64, device, True, seed=3)
    want = ops.windowed_readout(window=4, **inp)[:, 9:]
    tail = dict(inp, q=inp["q"][:, 9:])
    compare(windowed_readout(window=4, pos=9, **tail), want, inp, torch.float64)


def snapshots_for(inp, B, T, H, E, chunk, slots, dtype, device, seed, empty=False):
    g = torch.Generator().manual_seed(seed)
    S = (T - 1) // chunk + 1
    sk = rand((B, H, S, slots, E), dtype, device, g)
    sv = rand((B, H, S, slots, E), dtype, device, g)
    spos = torch.randint(-1, T, (B, S, slots), generator=g)
    if empty:
        spos.fill_(-1)
    return dict(inp, store_k=sk, store_v=sv), spos.to(device)


# (B, T, H, E, W, chunk, slots, empty): store entries spread over several chunks, slots off the
# tile, an empty store, T < chunk (one snapshot)
STORE_CASES = [(2, 21, 2, 5, 4, 5, 3, False), (1, 30, 1, 3, 3, 7, 18, False),
               (1, 9, 2, 4, 2, 4, 2, True), (1, 6, 1, 5, 2, 8, 4, False)]


@pytest.mark.parametrize("case", STORE_CASES, ids=lambda c: "B{}T{}H{}E{}W{}C{}M{}e{}".format(
    *c))
def test_all_sources_float64_vs_plain_loop(case, device):
    B, T, H, E, W, C, M, empty = case
    inp, spos = snapshots_for(qkv(B, T, H, E, torch.float64, device, True, seed=5), B, T, H, E,
                              C, M, torch.float64, device, seed=6, empty=empty)
    got = windowed_readout(window=W, store_pos=spos, chunk=C, **inp)
    want = windowed_readout_ref(window=W, store_pos=spos, chunk=C, **inp)
    compare(got, want, inp, torch.float64)


def test_plain_loop_matches_reference_op():
    inp = qkv(2, 13, 2, 3, torch.float64, "cpu", True, seed=7)
    assert_close("o", windowed_readout_ref(window=3, **inp),
                 ops.windowed_readout(window=3, **inp), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_all_sources(dtype, device):
    B, T, H, E, W, C, M = 2, 20, 2, 8, 4, 6, 3
    inp, spos = snapshots_for(qkv(B, T, H, E, dtype, device, True, seed=8), B, T, H, E, C, M,
                              dtype, device, seed=9)
    got = windowed_readout(window=W, store_pos=spos, chunk=C, **inp)
    want = windowed_readout_ref(window=W, store_pos=spos, chunk=C, **inp)
    compare(got, want, inp, dtype)


@pytest.mark.parametrize("T", [23, 4], ids=["store_fills", "T_below_chunk"])
def test_bmojo_layer_vs_reference_layer(T, device, monkeypatch):
    """The torch bmojo layer on the kernels (its readout, with the store's snapshots as a
    source, is this kernel) gives the reference layer's output and input gradient; at T = 23
    the store (capacity 3, select 2, chunk 5) is full from the third chunk on."""
    import memcore.kernels.triton.windowed_readout as mod
    from memcore.spec.reference import layers

    spec = memcore.spec.bmojo(d_model=12, n_heads=2, window=4, chunk=5, select=2, capacity=3,
                              d_state=4)
    params = memcore.init(spec, seed=0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, T, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y_ref, _ = layers.forward(spec, params, x)
    snaps = []
    real = mod.windowed_readout

    def spy(*args):
        snaps.append(args[8])  # store_pos [B, S, M]
        return real(*args)

    monkeypatch.setattr(mod, "windowed_readout", spy)
    monkeypatch.setenv("MEMCORE_KERNELS", "triton")
    layer = memcore.realize(spec, backend="torch", params=params).to(device, torch.float64)
    xd = x.to(device)
    y, _ = layer(xd)
    assert len(snaps) == 1
    if T == 23:
        assert (snaps[0][:, -1] >= 0).all(), "the last snapshot should be a full store"
    assert_close("y", y.cpu(), y_ref, torch.float64)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad((y.cpu() * dy).sum(), [x])
    (dx_ref,) = torch.autograd.grad((y_ref * dy).sum(), [x])
    assert_close("dx", dx, dx_ref, torch.float64)


def test_bad_input_names_the_argument():
    inp = qkv(1, 6, 2, 4, torch.float32, "cpu", True)
    with pytest.raises(ValueError, match="window must be an int"):
        windowed_readout(window=None, **inp)
    with pytest.raises(ValueError, match="fading_k must have k's shape"):
        windowed_readout(window=2, **dict(inp, fading_k=inp["k"][:, :3]))
    with pytest.raises(ValueError, match="k must be"):
        windowed_readout(window=2, **dict(inp, k=inp["k"][:, :3]))
    with pytest.raises(ValueError, match="pos must be"):
        windowed_readout(window=2, pos=-1, **inp)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        windowed_readout(window=2, **dict(inp, v=inp["v"].double()))
    sk = torch.zeros(1, 2, 1, 3, 4)
    with pytest.raises(ValueError, match="store_k must be"):
        windowed_readout(window=2, store_k=sk, store_v=sk, store_pos=torch.zeros(1, 1, 3).long(),
                        chunk=4, **inp)
    with pytest.raises(ValueError, match="together"):
        windowed_readout(window=2, store_k=sk, **inp)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_realistic(dtype):
    B, T, H, E, W, C, M = 2, 1000, 4, 64, 128, 64, 32
    inp, spos = snapshots_for(qkv(B, T, H, E, dtype, "cuda", True, seed=10), B, T, H, E, C, M,
                              dtype, "cuda", seed=11)
    got = windowed_readout(window=W, store_pos=spos, chunk=C, **inp)
    want = windowed_readout_ref(window=W, store_pos=spos, chunk=C, **inp)
    compare(got, want, inp, dtype)


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 40), W=st.integers(1, 12), E=st.integers(1, 9), C=st.integers(1, 12),
       M=st.integers(0, 5), split=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_drawn_shapes_vs_plain_loop(T, W, E, C, M, split, seed):
    """Drawn sizes, including an empty store (M = 0) and queries after a key cache."""
    a = min(split, T - 1)
    inp = qkv(1, T, 1, E, F64, DEVICE, True, seed=seed)
    inp, spos = snapshots_for(inp, 1, T, 1, E, C, M, F64, DEVICE, seed=seed + 1)
    S_tail = (T - 1) // C - a // C + 1
    tail = dict(inp, q=inp["q"][:, a:], store_k=inp["store_k"][:, :, a // C:][:, :, :S_tail],
                store_v=inp["store_v"][:, :, a // C:][:, :, :S_tail])
    sp = spos[:, a // C:][:, :S_tail]
    got = windowed_readout(window=W, store_pos=sp, chunk=C, pos=a, **tail)
    want = windowed_readout_ref(window=W, store_pos=sp, chunk=C, pos=a, **tail)
    compare(got, want, tail, F64)
