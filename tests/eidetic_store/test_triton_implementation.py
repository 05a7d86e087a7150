"""The torch backend's eidetic store operations (top entries, merge, innovation scores and
selection) take the Triton kernels or the torch path as told (``MEMCORE_KERNELS``): same entries
and scores as the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.eidetic_store as select_mod  # noqa: E402
from kcheck import assert_close  # noqa: E402
from memcore.backends.torch import eidetic_store as TE  # noqa: E402
from primitives import REF as ops  # noqa: E402
from primitives import TORCH as api  # noqa: E402
from tritoncheck import F64, both_paths, take_path  # noqa: E402


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


@both_paths
def test_store_ops_both_paths(mode, monkeypatch, device):
    calls = take_path(monkeypatch, mode, select_mod, "top_indices")
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


@both_paths
def test_innovation_select_both_paths(mode, monkeypatch, device):
    calls = take_path(monkeypatch, mode, select_mod, "select_indices")
    g = torch.Generator().manual_seed(6)
    toks = entry_set(1, 2, 11, 3, device, g, torch.arange(11)[None])
    store = entry_set(1, 2, 3, 3, device, g, torch.tensor([[-1, -1, -1]]))
    cand = entry_set(1, 2, 2, 3, device, g, torch.tensor([[-1, -1]]))
    toks["pos"] = torch.arange(11, device=device)[None]
    got = TE.select(toks, cand, store, 0, 4, 2, 3)
    want = TE.parallel(toks, cand, store, 0, 4, 2, 3)
    assert got[1:3] == want[1:3]
    for a, b in zip(got[:1] + got[3:], want[:1] + want[3:], strict=True):
        for f in b:
            assert torch.equal(a[f], b[f]), f
    assert len(calls) == (1 if mode == "triton" else 0)
    # the chunk loop of the reference layer, over the reference's merge
    snaps, kept, cand_ref = select_mod.innovation_select_ref(toks, 0, 4, 2, store, cand,
                                                             ops.store_merge)
    snap = got[0]
    B, H, nC, M, E = snap["k"].shape
    for f in ("k", "v"):
        assert torch.equal(snap[f].reshape(B, H, nC * M, E), snaps[f]), f
    assert torch.equal(snap["pos"].reshape(B, nC * M), snaps["pos"])
    for a, b in ((got[4], kept), (got[3], cand_ref)):
        for f in b:
            assert torch.equal(a[f], b[f]), f
