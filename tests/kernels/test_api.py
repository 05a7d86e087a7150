"""Dispatch between the Triton kernels and the torch path, and the op-signature entry points
(same results and states as memcore.spec.reference.ops)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.associative_readout as readout_mod  # noqa: E402
import memcore.kernels.triton.bmojo_attention as attn_mod  # noqa: E402
import memcore.kernels.triton.innovation_select as select_mod  # noqa: E402
import memcore.kernels.triton.leaky_average as leaky_mod  # noqa: E402
import memcore.kernels.triton.selective_scan as scan_mod  # noqa: E402
from kcheck import assert_close  # noqa: E402
from memcore.kernels.triton import api  # noqa: E402
from memcore.spec.reference import ops  # noqa: E402

F64 = torch.float64


def test_kernels_enabled_follows_device_and_env(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv(api.ENV, raising=False)
    assert api.kernels_enabled(x) is False  # a CPU tensor takes the torch path
    monkeypatch.setenv(api.ENV, "triton")
    assert api.kernels_enabled(x) is True
    monkeypatch.setenv(api.ENV, "torch")
    assert api.kernels_enabled(x) is False
    monkeypatch.setenv(api.ENV, "cuda")
    with pytest.raises(ValueError, match="MEMCORE_KERNELS must be one of"):
        api.kernels_enabled(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_cuda_tensor_uses_kernels(monkeypatch):
    monkeypatch.delenv(api.ENV, raising=False)
    assert api.kernels_enabled(torch.zeros(2, device="cuda")) is True


def spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapped(*a, **kw):
        calls.append(name)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def scan_args(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bt, Dc, T, N = 2, 4, 9, 3
    args = dict(u=torch.randn(Bt, Dc, T, generator=g, dtype=F64),
                delta=torch.randn(Bt, Dc, T, generator=g, dtype=F64),
                A=-torch.rand(Dc, N, generator=g, dtype=F64),
                B=torch.randn(Bt, N, T, generator=g, dtype=F64),
                C=torch.randn(Bt, N, T, generator=g, dtype=F64),
                D=torch.randn(Dc, generator=g, dtype=F64),
                initial_state=torch.randn(Bt, Dc, N, generator=g, dtype=F64))
    return {k: v.to(device) for k, v in args.items()}


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_selective_scan_both_paths(mode, monkeypatch, device):
    monkeypatch.setenv(api.ENV, mode)
    calls = spy(monkeypatch, scan_mod, "selective_scan")
    args = scan_args(device)
    y, h = api.selective_scan(**args, delta_softplus=True, return_final_state=True)
    yr, hr = ops.selective_scan(**args, delta_softplus=True, return_final_state=True)
    assert calls == (["selective_scan"] if mode == "triton" else [])
    assert_close("y", y, yr, F64)
    assert_close("h", h, hr, F64)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_leaky_average_both_paths(mode, monkeypatch, device):
    monkeypatch.setenv(api.ENV, mode)
    calls = spy(monkeypatch, leaky_mod, "leaky_average")
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 7, 3, 5, generator=g, dtype=F64)
    ld = -torch.rand(3, generator=g, dtype=F64)
    h0 = torch.randn(2, 3, 5, generator=g, dtype=F64)
    k, ld, h0 = k.to(device), ld.to(device), h0.to(device)
    y, h = api.leaky_average(k, ld, h0, return_final_state=True)
    yr, hr = ops.leaky_average(k, ld, h0, return_final_state=True)
    assert calls == (["leaky_average"] if mode == "triton" else [])
    assert_close("kbar", y, yr, F64)
    assert_close("h", h, hr, F64)


@pytest.mark.parametrize("window,fading,split", [(4, True, 7), (4, True, 2), (3, False, 5),
                                                 (None, False, 6)])
def test_windowed_attention_split_through_state(window, fading, split, monkeypatch, device):
    """Kernels on both halves, the state passed between them in the reference's ring layout:
    same outputs and final state as one reference pass."""
    monkeypatch.setenv(api.ENV, "triton")
    calls = spy(monkeypatch, attn_mod, "bmojo_attention")
    g = torch.Generator().manual_seed(2)
    B, T, H, E = 2, 15, 2, 3
    t = {n: torch.randn(B, T, H, E, generator=g, dtype=F64).to(device)
         for n in ("q", "k", "v", "fk", "fv")}

    def part(sl):
        kw = {"fading_k": t["fk"][:, sl], "fading_v": t["fv"][:, sl]} if fading else {}
        return (t["q"][:, sl], t["k"][:, sl], t["v"][:, sl]), kw

    (q, k, v), kw = part(slice(None))
    want, want_state = ops.windowed_attention(q, k, v, window, **kw, return_final_state=True)
    (q, k, v), kw = part(slice(0, split))
    o1, st = api.windowed_attention(q, k, v, window, **kw, return_final_state=True)
    (q, k, v), kw = part(slice(split, None))
    o2, st = api.windowed_attention(q, k, v, window, **kw, initial_state=st,
                                    return_final_state=True)
    assert len(calls) == 2
    assert_close("o", torch.cat([o1, o2], 1), want, F64)
    assert st["pos"] == want_state["pos"]
    for name in ("k", "v") + (("fk", "fv") if fading else ()):
        assert_close(f"state {name}", st[name], want_state[name], F64)


def test_bmojo_attention_torch_path_is_the_plain_loop(monkeypatch):
    monkeypatch.setenv(api.ENV, "torch")
    calls = spy(monkeypatch, attn_mod, "bmojo_attention")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, 1, 4, generator=g, dtype=F64) for _ in range(3))
    o = api.bmojo_attention(q, k, v, 2)
    assert calls == []
    assert_close("o", o, ops.windowed_attention(q, k, v, 2), F64)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_associative_readout_both_paths(mode, monkeypatch, device):
    monkeypatch.setenv(api.ENV, mode)
    calls = spy(monkeypatch, readout_mod, "associative_readout")
    g = torch.Generator().manual_seed(4)
    k, v = (torch.randn(2, 9, 2, 5, generator=g, dtype=F64).to(device) for _ in range(2))
    for cap in (None, 3):
        assert_close("y", api.associative_readout(k, v, cap), ops.associative_readout(k, v, cap),
                     F64)
    assert calls == (["associative_readout"] * 2 if mode == "triton" else [])


def entry_set(B, H, S, E, device, g, pos):
    """Entries with scores from {0, 1, 2} (ties); empty slots hold zeros, as a fresh store
    does (which empty slot fills a gap is not part of the contract of the torch path)."""
    filled = (pos >= 0).to(F64)
    return {"k": torch.randn(B, H, S, E, generator=g, dtype=F64).mul(
                filled[:, None, :, None]).to(device),
            "v": torch.randn(B, H, S, E, generator=g, dtype=F64).mul(
                filled[:, None, :, None]).to(device),
            "score": torch.randint(0, 3, (B, S), generator=g).to(F64).mul(filled).to(device),
            "pos": pos.to(device)}


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_store_ops_both_paths(mode, monkeypatch, device):
    monkeypatch.setenv(api.ENV, mode)
    calls = spy(monkeypatch, select_mod, "top_indices")
    g = torch.Generator().manual_seed(5)
    a = entry_set(2, 2, 5, 3, device, g, torch.tensor([[4, -1, 9, 2, -1], [0, 1, 2, 3, 5]]))
    b = entry_set(2, 2, 3, 3, device, g, torch.tensor([[11, 10, -1], [7, 6, 8]]))
    for got, want in ((api.store_top(a, 4), ops.store_top(a, 4)),
                      (api.store_merge(a, b, 6), ops.store_merge(a, b, 6))):
        for f in want:
            assert torch.equal(got[f], want[f]), f
    assert len(calls) == (2 if mode == "triton" else 0)
    x, s = (torch.randn(2, 4, 3, generator=g, dtype=F64).to(device) for _ in range(2))
    w = torch.randn(3, 3, generator=g, dtype=F64).to(device)
    assert_close("r", api.innovation_scores(x, s, w), ops.innovation_scores(x, s, w), F64)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_innovation_select_both_paths(mode, monkeypatch, device):
    monkeypatch.setenv(api.ENV, mode)
    calls = spy(monkeypatch, select_mod, "select_indices")
    g = torch.Generator().manual_seed(6)
    toks = entry_set(1, 2, 11, 3, device, g, torch.arange(11)[None])
    store = entry_set(1, 2, 3, 3, device, g, torch.tensor([[-1, -1, -1]]))
    cand = entry_set(1, 2, 2, 3, device, g, torch.tensor([[-1, -1]]))
    got = api.innovation_select(toks, 0, 4, 2, store, cand)
    want = select_mod.innovation_select_ref(toks, 0, 4, 2, store, cand, ops.store_merge)
    for a, b in zip(got, want, strict=True):
        for f in b:
            assert torch.equal(a[f], b[f]), f
    assert len(calls) == (1 if mode == "triton" else 0)
