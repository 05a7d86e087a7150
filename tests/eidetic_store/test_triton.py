"""Triton store selection against the reference store (``memcore.spec.reference.eidetic_store``):
the total order with many ties, ``store_top``/``store_merge``, and the per-chunk pipeline (top-K
per chunk, then the merge into a store of capacity M) against the reference layer's chunk loop.
Positions must be identical, and the gathered keys, values and scores exactly equal."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from kcheck import gpu  # noqa: E402
from memcore.backends.torch.eidetic_store import innovation_scores  # noqa: E402
from memcore.kernels.triton import eidetic_store as sel  # noqa: E402
from memcore.spec.reference.eidetic_store import innovation_scores as spec_scores  # noqa: E402
from primitives import REF as ops  # noqa: E402

LEVELS = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)  # a tiny set: many ties


def entries(B, H, S, E, device, g, filled=None, pos_base=0, dtype=torch.float64):
    """An entry set with distinct keys (so a wrong pick shows), scores from LEVELS, and
    ``filled`` slots of S filled with distinct positions (the rest empty, scattered)."""
    filled = S if filled is None else filled
    score = LEVELS[torch.randint(0, len(LEVELS), (B, S), generator=g)]
    pos = torch.full((B, S), -1, dtype=torch.int64)
    for b in range(B):
        slots = torch.randperm(S, generator=g)[:filled]
        pos[b, slots] = pos_base + torch.randperm(max(3 * S, 1), generator=g)[:filled]

    def mk():
        return torch.randn(B, H, S, E, generator=g, dtype=torch.float64).to(
            device=device, dtype=dtype).requires_grad_()

    return {"k": mk(), "v": mk(), "score": score.to(device=device, dtype=dtype),
            "pos": pos.to(device)}


def same(name, got, want):
    assert set(got) == set(want), name
    for f in want:
        assert got[f].shape == want[f].shape, (name, f, got[f].shape, want[f].shape)
        assert torch.equal(got[f].detach(), want[f].detach()), (name, f, got[f], want[f])


@pytest.mark.parametrize("S,filled,n", [(9, 9, 4), (9, 5, 9), (6, 3, 10), (1, 1, 1), (7, 0, 3),
                                        (5, 5, 0)])
def test_store_top_matches_reference(S, filled, n, device):
    g = torch.Generator().manual_seed(S * 31 + filled + n)
    e = entries(3, 2, S, 3, device, g, filled)
    same("top", sel.store_top(e, n), ops.store_top(e, n))


@pytest.mark.parametrize("Sa,fa,Sb,fb,n", [(4, 2, 5, 5, 4), (6, 6, 3, 1, 9), (0, 0, 4, 4, 2),
                                           (3, 0, 3, 0, 4)])
def test_store_merge_matches_reference(Sa, fa, Sb, fb, n, device):
    g = torch.Generator().manual_seed(Sa * 7 + Sb + n)
    a = entries(2, 2, Sa, 3, device, g, fa)
    b = entries(2, 2, Sb, 3, device, g, fb, pos_base=100)
    same("merge", sel.store_merge(a, b, n), ops.store_merge(a, b, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_entries(dtype, device):
    """Scores in a narrow float type: the same ties, so the same picks, as the reference."""
    g = torch.Generator().manual_seed(11)
    a = entries(2, 2, 6, 3, device, g, 4, dtype=dtype)
    b = entries(2, 2, 5, 3, device, g, 5, pos_base=50, dtype=dtype)
    same("merge", sel.store_merge(a, b, 7), ops.store_merge(a, b, 7))
    toks, store, cand = (entries(2, 1, 13, 2, device, g, dtype=dtype),
                         entries(2, 1, 3, 2, device, g, 2, pos_base=100, dtype=dtype),
                         entries(2, 1, 2, 2, device, g, 0, dtype=dtype))
    got = sel.innovation_select(toks, 0, 4, 2, store, cand)
    want = sel.innovation_select_ref(toks, 0, 4, 2, store, cand, ops.store_merge)
    for name, x, y in zip(("snapshots", "store", "candidates"), got, want, strict=True):
        same(name, x, y)


def pipeline_inputs(B, H, E, T, K, M, store_filled, cand_filled, pos, chunk, device, seed):
    g = torch.Generator().manual_seed(seed)
    toks = entries(B, H, T, E, device, g)
    # store positions are distinct and apart from the tokens' but interleaved with them, so
    # that ties on score between store entries and tokens go both ways
    store = entries(B, H, M, E, device, g, store_filled)
    free = torch.tensor([p for p in range(pos + T + 3 * M) if not pos <= p < pos + T],
                        dtype=torch.int64)
    for b in range(B):
        filled = store["pos"][b] >= 0
        pick = free[torch.randperm(len(free), generator=g)[:int(filled.sum())]]
        store["pos"][b, filled] = pick.to(store["pos"].device)
    cand = entries(B, H, K, E, device, g, min(cand_filled, pos % chunk))
    start = pos - pos % chunk
    for b in range(B):  # distinct positions of the chunk in progress, before pos
        filled = cand["pos"][b] >= 0
        n = int(filled.sum())
        cand["pos"][b, filled] = start + torch.randperm(max(pos % chunk, 1), generator=g)[:n].to(
            cand["pos"].device)
    return toks, store, cand


# (T, chunk, select K, capacity M, store filled, candidates filled, start pos): a partial
# store, select 0, select = chunk, capacity 0, a start inside a chunk with candidates carried
# in, a call ending inside a chunk, T = 1, K > chunk.
CASES = [(23, 5, 2, 4, 2, 0, 0), (12, 4, 0, 3, 3, 0, 0), (13, 4, 4, 5, 1, 0, 0),
         (10, 3, 2, 0, 0, 0, 0), (17, 6, 3, 4, 4, 2, 8), (1, 4, 2, 3, 1, 1, 2),
         (9, 3, 5, 6, 0, 0, 0), (20, 8, 3, 7, 5, 3, 13)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}C{}K{}M{}s{}c{}p{}".format(*c))
def test_pipeline_matches_reference_chunk_loop(case, device):
    T, C, K, M, sf, cf, pos = case
    toks, store, cand = pipeline_inputs(2, 2, 3, T, K, M, sf, cf, pos, C, device, seed=T + C)
    got = sel.innovation_select(toks, pos, C, K, store, cand)
    want = sel.innovation_select_ref(toks, pos, C, K, store, cand, ops.store_merge)
    for name, a, b in zip(("snapshots", "store", "candidates"), got, want, strict=True):
        same(name, a, b)


def test_pipeline_gradients_reach_the_picked_keys(device):
    toks, store, cand = pipeline_inputs(1, 2, 3, 14, 2, 3, 1, 0, 0, 4, device, seed=3)
    snaps, kept, _ = sel.innovation_select(toks, 0, 4, 2, store, cand)
    w_snaps, w_kept, _ = sel.innovation_select_ref(toks, 0, 4, 2, store, cand, ops.store_merge)
    loss = snaps["k"].sum() + 2 * kept["v"].sum()
    want = w_snaps["k"].sum() + 2 * w_kept["v"].sum()
    got_g = torch.autograd.grad(loss, [toks["k"], toks["v"], store["k"]])
    want_g = torch.autograd.grad(want, [toks["k"], toks["v"], store["k"]])
    for a, b in zip(got_g, want_g, strict=True):
        assert torch.equal(a, b)
    assert float(got_g[1].abs().sum()) > 0  # some token was kept


def test_empty_call_keeps_the_state(device):
    toks, store, cand = pipeline_inputs(2, 1, 2, 0, 2, 3, 2, 1, 5, 4, device, seed=4)
    snaps, kept, c = sel.innovation_select(toks, 5, 4, 2, store, cand)
    assert snaps["pos"].shape == (2, 0)
    same("store", kept, store)
    same("cand", c, cand)


def test_scores_match_reference():
    g = torch.Generator().manual_seed(5)
    x, s = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 3, generator=g)
    w = torch.randn(5, 3, generator=g)
    # the scores are a matmul, computed in torch for the kernels too
    for args in ((x, s, w), (x, None, None)):
        assert torch.allclose(innovation_scores(*args), spec_scores(*args), atol=0,
                              rtol=1e-6)


def test_bad_input_names_the_argument():
    s = torch.zeros(2, 5)
    p = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="n must be"):
        sel.top_indices(s, p, s, p, -1)
    with pytest.raises(TypeError, match="pos must be an integer"):
        sel.top_indices(s, p.float(), s, p, 2)
    with pytest.raises(ValueError, match="b must have batch 2"):
        sel.top_indices(s, p, s[:1], p[:1], 2)
    with pytest.raises(ValueError, match="chunk must be"):
        sel.select_indices(s, 0, 0, 2, s, p, s[:, :2], p[:, :2])
    with pytest.raises(ValueError, match="select = 3"):
        sel.select_indices(s, 0, 4, 3, s, p, s[:, :2], p[:, :2])


@gpu
def test_gpu_realistic():
    T, C, K, M = 4096, 64, 8, 128
    toks, store, cand = pipeline_inputs(4, 4, 32, T, K, M, 60, 0, 0, C, "cuda", seed=9)
    got = sel.innovation_select(toks, 0, C, K, store, cand)
    want = sel.innovation_select_ref(toks, 0, C, K, store, cand, ops.store_merge)
    for name, a, b in zip(("snapshots", "store", "candidates"), got, want, strict=True):
        same(name, a, b)
