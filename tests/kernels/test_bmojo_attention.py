"""Triton B'MOJO attention against the reference: raw and fading windows against
``memcore.spec.reference.ops.windowed_attention``, the store against the reference bmojo layer,
and every source together against the plain-torch ``bmojo_attention_ref``; forward and
gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton")

import array_api_compat  # noqa: E402
from kcheck import DEVICE, assert_close, gpu, grads  # noqa: E402
from memcore.kernels.triton.bmojo_attention import (  # noqa: E402
    bmojo_attention,
    bmojo_attention_ref,
)
from memcore.spec.reference import layers, mamba, ops, windowed  # noqa: E402
from memcore.spec.reference._xp import params_as  # noqa: E402
from memcore.spec.reference.attention import positions  # noqa: E402

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
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(got_out.shape, generator=g, dtype=torch.float64).to(got_out)
    got = grads((got_out,), list(inputs.values()), (do,))
    want = grads((want_out,), list(inputs.values()), (do,))
    for name, a, b in zip(inputs, got, want, strict=True):
        assert a.dtype == inputs[name].dtype, name
        assert_close(f"d{name}", a, b, dtype)


# (B, T, H, E, W): T off the 16-row tile, T < W, T = 1, odd head widths, W = 1,
# and W = None (full causal attention, raw keys only)
SHAPES = [(2, 21, 2, 5, 6), (1, 5, 1, 3, 8), (1, 1, 2, 4, 3), (1, 37, 1, 17, 1),
          (2, 19, 1, 6, None)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}E{}W{}".format(*s))
def test_windows_float64_vs_reference_op(shape, device):
    B, T, H, E, W = shape
    fading = W is not None
    inp = qkv(B, T, H, E, torch.float64, device, fading)
    got = bmojo_attention(window=W, **inp)
    want = ops.windowed_attention(window=W, **inp)
    compare(got, want, inp, torch.float64)


def test_key_cache_before_the_queries(device):
    """Queries for the tail of a sequence with the keys of the whole sequence (a prefill after
    a cache) equal the tail of one pass."""
    inp = qkv(1, 23, 2, 5, torch.float64, device, True, seed=3)
    want = ops.windowed_attention(window=4, **inp)[:, 9:]
    tail = dict(inp, q=inp["q"][:, 9:])
    compare(bmojo_attention(window=4, pos=9, **tail), want, inp, torch.float64)


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
    got = bmojo_attention(window=W, store_pos=spos, chunk=C, **inp)
    want = bmojo_attention_ref(window=W, store_pos=spos, chunk=C, **inp)
    compare(got, want, inp, torch.float64)


def test_plain_loop_matches_reference_op():
    inp = qkv(2, 13, 2, 3, torch.float64, "cpu", True, seed=7)
    assert_close("o", bmojo_attention_ref(window=3, **inp),
                 ops.windowed_attention(window=3, **inp), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_all_sources(dtype, device):
    B, T, H, E, W, C, M = 2, 20, 2, 8, 4, 6, 3
    inp, spos = snapshots_for(qkv(B, T, H, E, dtype, device, True, seed=8), B, T, H, E, C, M,
                              dtype, device, seed=9)
    got = bmojo_attention(window=W, store_pos=spos, chunk=C, **inp)
    want = bmojo_attention_ref(window=W, store_pos=spos, chunk=C, **inp)
    compare(got, want, inp, dtype)


def store_snapshots(xp, spec, p, x, s, k, v):
    """The store before each chunk, built from DESIGN 2.4 with the reference's store ops:
    k, v [B, H, T, E] -> store_k, store_v [B, H, S, M, E], store_pos [B, S, M]."""
    st = spec.store
    B, T, _ = x.shape
    s_prev = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], 1)
    scores = ops.innovation_scores(x, s_prev, p["pred_proj.weight"])
    pos = torch.arange(T).expand(B, T)
    kept = _empty_like({"k": k, "score": scores}, st.capacity)
    snaps = []
    for c0 in range(0, T, st.chunk):
        snaps.append(kept)
        sl = slice(c0, min(c0 + st.chunk, T))
        seg = {"k": k[:, :, sl], "v": v[:, :, sl], "score": scores[:, sl], "pos": pos[:, sl]}
        cand = ops.store_merge(_empty_like(seg, st.select), seg, st.select)
        if sl.stop - sl.start == st.chunk:
            kept = ops.store_merge(kept, cand, st.capacity)
    return (torch.stack([e["k"] for e in snaps], 2), torch.stack([e["v"] for e in snaps], 2),
            torch.stack([e["pos"] for e in snaps], 1))


def _empty_like(entries, n):
    k = entries["k"]
    B, H, _, E = k.shape
    return {"k": k.new_zeros(B, H, n, E), "v": k.new_zeros(B, H, n, E),
            "score": entries["score"].new_zeros(B, n),
            "pos": torch.full((B, n), -1, dtype=torch.int64)}


@pytest.mark.parametrize("T", [23, 4], ids=["store_fills", "T_below_chunk"])
def test_bmojo_layer_vs_reference_layer(T, device):
    """The reference bmojo layer with its readout replaced by the kernel gives the reference
    layer's output and input gradient; at T = 23 the store (capacity 3, select 2, chunk 5) is
    full from the third chunk on."""
    if device != "cpu":
        pytest.skip("the reference layer runs on the CPU")
    spec = memcore.spec.bmojo(d_model=12, n_heads=2, window=4, chunk=5, select=2, capacity=3,
                              d_state=4)
    params = memcore.init(spec, seed=0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, T, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y_ref, _ = layers.forward(spec, params, x)

    xp = array_api_compat.array_namespace(x)
    p = params_as(xp, params, x)
    qpos = positions(xp, 0, T, x)
    q, k, v = windowed._qkv(xp, spec, p, x, qpos)  # [B, H, T, E]
    st0 = windowed.init_state(xp, spec, 2, x.dtype, x)
    s, _ = mamba.forward(xp, spec.fading_block, windowed._sub(p, "fading."), x,
                         {"conv": st0["conv"], "ssm": st0["ssm"]})
    fk, fv = windowed._fading_kv(xp, spec, p, s, qpos)
    sk, sv, spos = store_snapshots(xp, spec, p, x, s, k, v)
    if T == 23:
        assert (spos[:, -1] >= 0).all(), "the last snapshot should be a full store"

    def bthe(a):
        return a.permute(0, 2, 1, 3)

    o = bmojo_attention(bthe(q), bthe(k), bthe(v), spec.window, bthe(fk), bthe(fv), sk, sv,
                        spos, spec.store.chunk)
    y = windowed._merge_out(xp, spec, p, bthe(o))
    assert_close("y", y, y_ref, torch.float64)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad((y * dy).sum(), [x])
    (dx_ref,) = torch.autograd.grad((y_ref * dy).sum(), [x])
    assert_close("dx", dx, dx_ref, torch.float64)


def test_bad_input_names_the_argument():
    inp = qkv(1, 6, 2, 4, torch.float32, "cpu", True)
    with pytest.raises(ValueError, match="window must be an int"):
        bmojo_attention(window=None, **inp)
    with pytest.raises(ValueError, match="fading_k must have k's shape"):
        bmojo_attention(window=2, **dict(inp, fading_k=inp["k"][:, :3]))
    with pytest.raises(ValueError, match="k must be"):
        bmojo_attention(window=2, **dict(inp, k=inp["k"][:, :3]))
    with pytest.raises(ValueError, match="pos must be"):
        bmojo_attention(window=2, pos=-1, **inp)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        bmojo_attention(window=2, **dict(inp, v=inp["v"].double()))
    sk = torch.zeros(1, 2, 1, 3, 4)
    with pytest.raises(ValueError, match="store_k must be"):
        bmojo_attention(window=2, store_k=sk, store_v=sk, store_pos=torch.zeros(1, 1, 3).long(),
                        chunk=4, **inp)
    with pytest.raises(ValueError, match="together"):
        bmojo_attention(window=2, store_k=sk, **inp)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_realistic(dtype):
    B, T, H, E, W, C, M = 2, 1000, 4, 64, 128, 64, 32
    inp, spos = snapshots_for(qkv(B, T, H, E, dtype, "cuda", True, seed=10), B, T, H, E, C, M,
                              dtype, "cuda", seed=11)
    got = bmojo_attention(window=W, store_pos=spos, chunk=C, **inp)
    want = bmojo_attention_ref(window=W, store_pos=spos, chunk=C, **inp)
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
    got = bmojo_attention(window=W, store_pos=sp, chunk=C, pos=a, **tail)
    want = bmojo_attention_ref(window=W, store_pos=sp, chunk=C, pos=a, **tail)
    compare(got, want, tail, F64)
