"""Banded attention split into groups of query blocks (bounded temporaries) against the
reference in float64 (DESIGN 6: <= 1e-9): values and gradients, raw and fading windows, a
call that starts mid-stream, and the block length."""

from __future__ import annotations

import pytest
import torch
from memcore.backends.torch import banded as attention
from memcore.backends.torch import numerics
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F64, rel


def _qkv(seed, T, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, T, 2, 3, generator=g, dtype=torch.float64) for _ in range(n)]


def _grads(impl, arrays, window, weight, state=None):
    arrays = [a.detach().requires_grad_(True) for a in arrays]
    q, k, v, fk, fv = arrays
    o = impl.windowed_readout(q, k, v, window, fading_k=fk, fading_v=fv,
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
    o_r = R.windowed_readout(q, k, v, W, fading_k=fk, fading_v=fv)
    _, s1 = O.windowed_readout(q[:, :a], k[:, :a], v[:, :a], W, fading_k=fk[:, :a],
                                 fading_v=fv[:, :a], return_final_state=True)
    o2 = O.windowed_readout(q[:, a:], k[:, a:], v[:, a:], W, fading_k=fk[:, a:],
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
    o = O.windowed_readout(q, k, v, 8, fading_k=fk, fading_v=fv)
    assert len(seen) > 1 and sum(n for n, _ in seen) == T
    assert all(elements <= 3000 for _, elements in seen)
    assert rel(o, R.windowed_readout(q, k, v, 8, fading_k=fk, fading_v=fv)) <= F64


@pytest.mark.parametrize("T,band,expected", [(1000, 128, 64), (1000, 5, 16), (10, 128, 10),
                                             (1000, 129, 65)])
def test_block_length_is_half_the_widest_band(T, band, expected):
    k = torch.zeros(1, 1, 1, 1)
    assert attention.block_len(T, [(k, k, 0, 0, band), (k, k, 0, band, band + 3)]) == expected


def _band_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    W, T = 3, 9
    q = torch.randn(1, 2, T, 2, generator=g, dtype=torch.float64)
    kv = [torch.randn(1, 2, T + 2 * W, 2, generator=g, dtype=torch.float64) for _ in range(4)]
    return W, q, kv


def _sources(W, k, v, fk, fv):
    return [(k[:, :, W:], v[:, :, W:], -W, 0, W), (fk, fv, -2 * W, W, 2 * W)]


def test_band_softmax_passes_gradcheck():
    # The hand-written backward, through the normalised readout (m is a stabiliser only).
    W, q, kv = _band_inputs(3)
    inputs = tuple(a.requires_grad_(True) for a in (q, *kv))

    def f(q, k, v, fk, fv):
        return numerics.combine([attention.band_partial(q, 0, _sources(W, k, v, fk, fv),
                                                         0.7, block=4)])

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("which", [1, 2])
def test_band_softmax_through_l_or_acc_alone(which):
    # One output without a gradient: the same as autograd through ``partial`` on the
    # windows (both hold m fixed).
    W, q, kv = _band_inputs(4)
    g = torch.Generator().manual_seed(9)

    def grads(fn):
        inputs = [a.detach().requires_grad_(True) for a in (q, *kv)]
        out = fn(inputs[0], _sources(W, *inputs[1:]))[which]
        weight = torch.randn(out.shape, generator=g.manual_seed(9), dtype=out.dtype)
        return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True,
                                   materialize_grads=True)

    def autograd_partial(q, srcs):
        qb, kw, vw, mask = attention._band_windows(q, 0, srcs, 4)
        m, l, acc = numerics.partial((qb @ kw.transpose(-1, -2)) * 0.7, mask, vw)
        T = q.shape[2]
        return (None, l.reshape(1, 2, -1, 1)[:, :, :T], acc.reshape(1, 2, -1, 2)[:, :, :T])

    ours = grads(lambda q, srcs: attention.band_partial(q, 0, srcs, 0.7, block=4))
    expected = grads(autograd_partial)
    for name, a, b in zip("q k v fk fv".split(), ours, expected, strict=True):
        assert rel(a, b) <= F64, name


def test_fold_is_the_adjoint_of_the_windows():
    # <windows(x), g> == <x, fold(g)> for every x and g: fold is unfold's transpose.
    g = torch.Generator().manual_seed(0)
    Q, Lw, nB = 4, 11, 5
    x = torch.randn(1, 2, (nB - 1) * Q + Lw, 3, generator=g, dtype=torch.float64)
    gw = torch.randn(1, 2, nB, Lw, 3, generator=g, dtype=torch.float64)
    lhs = (attention._windows((x, Lw), Q) * gw).sum()
    rhs = (x * attention._fold(gw, Q)).sum()
    assert attention._fold(gw, Q).shape == x.shape
    assert abs(float(lhs - rhs)) <= F64 * abs(float(lhs))
