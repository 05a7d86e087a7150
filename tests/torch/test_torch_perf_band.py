"""Banded attention split into groups of query blocks (bounded temporaries) against the
reference in float64 (DESIGN 6: <= 1e-9): values and gradients, raw and fading windows, a
call that starts mid-stream, and the block length."""

from __future__ import annotations

import pytest
import torch
from memcore.backends.torch import attention
from memcore.backends.torch import ops as O
from memcore.spec.reference import ops as R
from torchcheck import F64, rel


def _qkv(seed, T, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, T, 2, 3, generator=g, dtype=torch.float64) for _ in range(n)]


def _grads(impl, arrays, window, weight, state=None):
    arrays = [a.detach().requires_grad_(True) for a in arrays]
    q, k, v, fk, fv = arrays
    o = impl.windowed_attention(q, k, v, window, fading_k=fk, fading_v=fv,
                                initial_state=state)
    return o, torch.autograd.grad((o * weight).sum(), arrays)


@pytest.mark.parametrize("score_elements,T,window", [(1, 23, 3), (200, 41, 4), (900, 40, 2)])
def test_grouped_queries_match_the_reference(monkeypatch, score_elements, T, window):
    # 1: one block per group; 200 and 900: several blocks per group, the last group short.
    monkeypatch.setattr(attention, "SCORE_ELEMENTS", score_elements)
    arrays = _qkv(T, T)
    weight = torch.randn(2, T, 2, 3, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    o, grads = _grads(O, arrays, window, weight)
    o_r, grads_r = _grads(R, arrays, window, weight)
    assert rel(o, o_r) <= F64
    for name, a, b in zip("q k v fk fv".split(), grads, grads_r, strict=True):
        assert rel(a, b) <= F64, name


def test_grouped_queries_after_a_prefix(monkeypatch):
    monkeypatch.setattr(attention, "SCORE_ELEMENTS", 150)
    q, k, v, fk, fv = _qkv(5, 30)
    W, a = 3, 11
    o_r = R.windowed_attention(q, k, v, W, fading_k=fk, fading_v=fv)
    _, s1 = O.windowed_attention(q[:, :a], k[:, :a], v[:, :a], W, fading_k=fk[:, :a],
                                 fading_v=fv[:, :a], return_final_state=True)
    o2 = O.windowed_attention(q[:, a:], k[:, a:], v[:, a:], W, fading_k=fk[:, a:],
                              fading_v=fv[:, a:], initial_state=s1)
    assert rel(o2, o_r[:, a:]) <= F64


def test_groups_bound_the_scores(monkeypatch):
    # Every group's score matrix stays within SCORE_ELEMENTS (when one block fits).
    monkeypatch.setattr(attention, "SCORE_ELEMENTS", 3000)
    seen = []
    inner = attention._band_partial

    def spy(q, pos, sources, scale, block):
        out = inner(q, pos, sources, scale, block)
        keys = sum(block + hi - lo - 1 for _, _, _, lo, hi in sources)
        seen.append((q.shape[2], q.shape[0] * q.shape[1] * -(-q.shape[2] // block) * block
                     * keys))
        return out

    monkeypatch.setattr(attention, "_band_partial", spy)
    T = 200
    q, k, v, fk, fv = _qkv(2, T)
    o = O.windowed_attention(q, k, v, 8, fading_k=fk, fading_v=fv)
    assert len(seen) > 1 and sum(n for n, _ in seen) == T
    assert all(elements <= 3000 for _, elements in seen)
    assert rel(o, R.windowed_attention(q, k, v, 8, fading_k=fk, fading_v=fv)) <= F64


@pytest.mark.parametrize("T,band,expected", [(1000, 128, 64), (1000, 5, 16), (10, 128, 10),
                                             (1000, 129, 65)])
def test_block_length_is_half_the_widest_band(T, band, expected):
    k = torch.zeros(1, 1, 1, 1)
    assert attention.block_len(T, [(k, k, 0, 0, band), (k, k, 0, band, band + 3)]) == expected
