"""The torch backend's store ops (total order, top, merge) and innovation scores vs the
reference's."""

from __future__ import annotations

import pytest
import torch
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F64, rel

D64 = torch.float64


def _randn(g, *shape, dtype=D64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _entries(g, pos, H, E, n_filled):
    """An entry set at distinct positions ``pos`` [B, S]; slots from n_filled on are empty.
    Scores take 3 values, so ties (broken by the later position) are common."""
    B, S = pos.shape
    pos = pos.clone()
    pos[:, n_filled:] = -1
    filled = pos >= 0
    score = torch.randint(0, 3, (B, S), generator=g).to(D64)
    k, v = _randn(g, B, H, S, E), _randn(g, B, H, S, E)
    return {"k": k * filled[:, None, :, None], "v": v * filled[:, None, :, None],
            "score": torch.where(filled, score, torch.zeros_like(score)), "pos": pos}


@pytest.mark.parametrize("n", [0, 1, 4, 9])
def test_store_top_and_merge_follow_the_total_order(n):
    g = torch.Generator().manual_seed(n)
    perm = torch.stack([torch.randperm(40, generator=g)[:11] for _ in range(3)])
    a = _entries(g, perm[:, :6], 2, 3, 4)
    b = _entries(g, perm[:, 6:], 2, 3, 5)
    for out, ref in ((O.store_top(a, n), R.store_top(a, n)),
                     (O.store_merge(a, b, n), R.store_merge(a, b, n))):
        assert out.keys() == ref.keys()
        assert torch.equal(out["pos"], ref["pos"])
        for f in ("k", "v", "score"):
            assert out[f].shape == ref[f].shape and rel(out[f], ref[f]) <= F64


def test_innovation_scores():
    g = torch.Generator().manual_seed(3)
    x, s = _randn(g, 2, 6, 5), _randn(g, 2, 6, 5)
    w = _randn(g, 5, 5)
    assert rel(O.innovation_scores(x, s, w), R.innovation_scores(x, s, w)) <= F64
    assert rel(O.innovation_scores(x, None, None), R.innovation_scores(x, None, None)) <= F64
