"""``memcore.backends.torch.ops`` vs ``memcore.spec.reference.ops`` (same names, signatures and
states), float64 within 1e-9, gradients included; ``memcore.ops`` routes torch tensors to the
backend."""

from __future__ import annotations

import pytest
import torch
from memcore.backends.torch import ops as O
from memcore.spec.reference import ops as R
from torchcheck import F32, F64, rel, rmse

import memcore.ops as mops

D64 = torch.float64


def _randn(g, *shape, dtype=D64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _scan_args(g, Bt, Dc, N, T, groups, dtype=D64):
    u, delta, z = (_randn(g, Bt, Dc, T, dtype=dtype) for _ in range(3))
    A = -torch.rand(Dc, N, generator=g, dtype=torch.float64).to(dtype) * 2
    shape = (Bt, groups, N, T) if groups else (Bt, N, T)
    B, C = _randn(g, *shape, dtype=dtype), _randn(g, *shape, dtype=dtype)
    D, bias = _randn(g, Dc, dtype=dtype), _randn(g, Dc, dtype=dtype)
    h0 = _randn(g, Bt, Dc, N, dtype=dtype)
    return u, delta, A, B, C, D, z, bias, h0


@pytest.mark.parametrize("T", [1, 15, 16, 17, 50])
@pytest.mark.parametrize("groups", [0, 1, 3])
def test_selective_scan(T, groups):
    g = torch.Generator().manual_seed(T + groups)
    u, delta, A, B, C, D, z, bias, h0 = _scan_args(g, 2, 6, 3, T, groups)
    for kw in (dict(), dict(D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=h0)):
        y, h = O.selective_scan(u, delta, A, B, C, return_final_state=True, **kw)
        y_r, h_r = R.selective_scan(u, delta, A, B, C, return_final_state=True, **kw)
        assert rel(y, y_r) <= F64 and rel(h, h_r) <= F64
        assert h.dtype == D64
    # step form: each step equals the reference's step, and the fold equals the scan
    h, h_ref = h0, h0
    for t in range(T):
        a = (u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
        y_t, h = O.selective_state_update(h, *a)
        y_r, h_ref = R.selective_state_update(h_ref, *a)
        assert rel(y_t, y_r) <= F64 and rel(h, h_ref) <= F64
    y_full, h_full = R.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                      return_final_state=True)
    assert rel(y_t, y_full[..., -1]) <= F64 and rel(h, h_full) <= F64


def test_selective_scan_gradients_include_the_initial_state():
    g = torch.Generator().manual_seed(0)
    args = [a.requires_grad_(True) for a in _scan_args(g, 2, 4, 3, 21, 2)]
    w = torch.randn(2, 4, 21, generator=g, dtype=D64)
    wh = torch.randn(2, 4, 3, generator=g, dtype=D64)
    grads = []
    for impl in (O, R):
        u, delta, A, B, C, D, z, bias, h0 = args
        y, h = impl.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                   return_final_state=True)
        grads.append(torch.autograd.grad((y * w).sum() + (h * wh).sum(), args))
    for name, a, b in zip("u delta A B C D z bias h0".split(), *grads, strict=True):
        assert rel(a, b) <= F64, name
    assert grads[0][-1].abs().sum() > 0


def test_selective_scan_float32():
    g = torch.Generator().manual_seed(1)
    args = _scan_args(g, 2, 8, 4, 70, 0)
    u, delta, A, B, C, D, z, bias, h0 = (a.float() for a in args)
    y = O.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0)
    y_r = R.selective_scan(*args[:7], args[7], True, initial_state=args[8])
    assert y.dtype == torch.float32 and rmse(y, y_r) <= F32


@pytest.mark.parametrize("T", [1, 7, 33])
def test_leaky_average(T):
    g = torch.Generator().manual_seed(T)
    k = _randn(g, 2, T, 3, 5).requires_grad_(True)
    decay = (-torch.rand(3, generator=g, dtype=D64) * 3).requires_grad_(True)
    h0 = _randn(g, 2, 3, 5).requires_grad_(True)
    y, h = O.leaky_average(k, decay, h0, return_final_state=True)
    y_r, h_r = R.leaky_average(k, decay, h0, return_final_state=True)
    assert rel(y, y_r) <= F64 and rel(h, h_r) <= F64
    ga = torch.autograd.grad(y.sum() + h.sum(), (k, decay, h0))
    gb = torch.autograd.grad(y_r.sum() + h_r.sum(), (k, decay, h0))
    for a, b in zip(ga, gb, strict=True):
        assert rel(a, b) <= F64
    s = h0
    for t in range(T):
        y_t, s = O.leaky_average_step(k[:, t], decay, s)
        assert rel(y_t, y_r[:, t]) <= F64


# Fading keys need a window (see test_ops_reject_bad_shapes for window=None with fading).
@pytest.mark.parametrize("window,fading", [(None, False), (1, False), (3, False), (8, False),
                                           (1, True), (3, True), (8, True)])
def test_windowed_attention_forms_and_splits(window, fading):
    g = torch.Generator().manual_seed(7)
    T = 13
    q, k, v, fk, fv = (_randn(g, 2, T, 2, 3) for _ in range(5))
    fa = dict(fading_k=fk, fading_v=fv) if fading else {}
    o, s = O.windowed_attention(q, k, v, window, return_final_state=True, **fa)
    o_r, s_r = R.windowed_attention(q, k, v, window, return_final_state=True, **fa)
    assert rel(o, o_r) <= F64
    assert s.keys() == s_r.keys() and s["pos"] == s_r["pos"]
    for key in s:
        if key != "pos":
            assert rel(s[key], s_r[key]) <= F64, key
    for a in (1, 5, 12):
        fa1 = dict(fading_k=fk[:, :a], fading_v=fv[:, :a]) if fading else {}
        fa2 = dict(fading_k=fk[:, a:], fading_v=fv[:, a:]) if fading else {}
        o1, s1 = O.windowed_attention(q[:, :a], k[:, :a], v[:, :a], window,
                                      return_final_state=True, **fa1)
        o2 = O.windowed_attention(q[:, a:], k[:, a:], v[:, a:], window, initial_state=s1, **fa2)
        assert rel(torch.cat([o1, o2], 1), o_r) <= F64
    st = O.windowed_attention_state(q, window, fading)
    for t in range(T):
        fs = dict(fading_k_t=fk[:, t], fading_v_t=fv[:, t]) if fading else {}
        o_t, st = O.windowed_attention_step(q[:, t], k[:, t], v[:, t], st, window, **fs)
        assert rel(o_t, o_r[:, t]) <= F64


@pytest.mark.parametrize("capacity", [None, 1, 2, 5, 40])
@pytest.mark.parametrize("T", [1, 2, 17])
def test_associative_readout(capacity, T):
    g = torch.Generator().manual_seed(T)
    k = _randn(g, 2, T, 3, 3).requires_grad_(True)
    v = _randn(g, 2, T, 3, 3).requires_grad_(True)
    y = O.associative_readout(k, v, capacity)
    y_r = R.associative_readout(k, v, capacity)
    assert rel(y, y_r) <= F64
    assert not y[:, 0].abs().any()  # the first position has no past
    w = torch.randn(y.shape, generator=g, dtype=D64)
    # T = 1 reads nothing: unused inputs then have a zero gradient.
    ga = torch.autograd.grad((y * w).sum(), (k, v), allow_unused=True, materialize_grads=True)
    gb = torch.autograd.grad((y_r * w).sum(), (k, v), allow_unused=True, materialize_grads=True)
    for a, b in zip(ga, gb, strict=True):
        assert torch.isfinite(a).all() and rel(a, b) <= F64


def test_persistent_readout():
    g = torch.Generator().manual_seed(2)
    k = _randn(g, 2, 5, 3, 4)
    mk, mv = _randn(g, 3, 7, 4), _randn(g, 3, 7, 4)
    assert rel(O.persistent_readout(k, mk, mv), R.persistent_readout(k, mk, mv)) <= F64
    with pytest.raises(ValueError, match="mem_k and mem_v"):
        O.persistent_readout(k, mk[:, :, :3], mv)


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


def test_memcore_ops_routes_torch_tensors_to_the_backend(monkeypatch):
    calls = []
    real = O.leaky_average

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(O, "leaky_average", spy)
    g = torch.Generator().manual_seed(0)
    k = _randn(g, 1, 4, 2, 3)
    y = mops.leaky_average(k, torch.tensor([-0.5, -1.0], dtype=D64))
    assert calls == [1]
    assert rel(y, R.leaky_average(k, torch.tensor([-0.5, -1.0], dtype=D64))) <= F64
    for name in R.__all__:
        assert callable(getattr(O, name)), name


def test_ops_reject_bad_shapes():
    g = torch.Generator().manual_seed(0)
    u, delta, A, B, C, D, z, bias, h0 = _scan_args(g, 2, 4, 3, 5, 0)
    with pytest.raises(ValueError, match="delta must have u's shape"):
        O.selective_scan(u, delta[..., :4], A, B, C)
    with pytest.raises(ValueError, match="initial_state must be"):
        O.selective_scan(u, delta, A, B, C, initial_state=h0[:, :3])
    with pytest.raises(ValueError, match="log_decay must be"):
        O.leaky_average(_randn(g, 1, 4, 2, 3), torch.zeros(3, dtype=D64))
    q = _randn(g, 1, 4, 2, 3)
    with pytest.raises(ValueError, match="window must be an int"):
        O.windowed_attention(q, q, q, None, fading_k=q, fading_v=q)
    with pytest.raises(ValueError, match="k must have q's shape"):
        O.windowed_attention(q, q[:, :3], q, 2)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        O.associative_readout(q, q, 0)


def test_banded_attention_never_builds_a_t_by_t_matrix():
    from memcore.backends.torch.attention import _band_windows

    g = torch.Generator().manual_seed(0)
    T, W = 500, 3
    q, k = _randn(g, 1, 1, T, 2), _randn(g, 1, 1, T + W, 2)
    qb, kw, vw, mask = _band_windows(q, 0, [(k, k, -W, 0, W)], None)
    Q = qb.shape[3]
    assert Q < T and kw.shape[-2] == Q + W - 1 and mask.shape[-1] == Q + W - 1
