"""The model spec's short causal convolution (``short_conv``) in every tree: the spec (JSON, the
default leaves old specs as they were, validation), its parameters and sizes, the reference's
forms against the formula written out, torch and JAX against the reference in float64 (parallel,
split calls, streaming), and packed rows against separate documents."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from memcore.spec import sizes
from memcore.spec.reference import model as RM

import memcore
from memcore import spec as S

LAYERS = [S.mamba(6, d_state=2), S.bmojo(6, 2, window=2, chunk=3, select=1, capacity=2,
                                        d_state=2), S.mosaic(6, 2)]
SPEC = S.model(LAYERS, 9, ffn="persistent", short_conv=3)
T = 8


def _tokens(B, T_, seed=0):
    return np.random.default_rng(seed).integers(0, SPEC.vocab_size, (B, T_))


def _params(spec=SPEC):
    return memcore.init(spec, 0, dtype=np.float64)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_spec_field_json_and_default():
    plain = S.model(LAYERS, 9, ffn="persistent")
    assert "short_conv" not in plain.to_json()
    assert S.model(LAYERS, 9, ffn="persistent", short_conv=0).spec_id == plain.spec_id
    assert '"short_conv":3' in SPEC.to_json()
    back = S.from_json(SPEC.to_json())
    assert back == SPEC and back.short_conv == 3 and back.spec_id == SPEC.spec_id
    assert SPEC.spec_id != plain.spec_id
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises((ValueError, TypeError), match="short_conv"):
            S.model(LAYERS, 9, short_conv=bad)


def test_params_and_sizes():
    shapes = memcore.spec.params.param_shapes(SPEC)
    conv = {n: s for n, s in shapes.items() if ".conv." in n}
    assert conv == {f"layers.{i}.conv.weight": (6, 3) for i in range(3)}
    w = memcore.init(SPEC, 0)["layers.1.conv.weight"]
    assert np.abs(w).max() <= 3 ** -0.5 and np.abs(w).max() > 0.3 * 3 ** -0.5
    plain = S.model(LAYERS, 9, ffn="persistent")
    p_plain = memcore.init(plain, 0)
    p = memcore.init(SPEC, 0)
    assert all(np.array_equal(p[n], a) for n, a in p_plain.items())  # the others unchanged
    assert sizes.param_bytes(SPEC) - sizes.param_bytes(plain) == 3 * 6 * 3 * 4
    # the conv's streaming state: K - 1 past inputs of width D per block
    assert sizes.state_bytes(SPEC, 2) - sizes.state_bytes(plain, 2) == 3 * 2 * 2 * 6 * 4
    st = RM.init_state(SPEC, 2, np.zeros(1, np.float32))
    assert [c.shape for c in st["conv"]] == [(2, 2, 6)] * 3


def test_reference_conv_is_the_formula():
    """One block, no mixer effect isolated: the conv output fed to the mixer is
    sum_k w[:, k] g_{t-K+1+k} with zeros before the first token."""
    from memcore.spec.reference import short_conv as C

    rng = np.random.default_rng(1)
    g, w = rng.normal(size=(2, 5, 4)), rng.normal(size=(4, 3))
    y, past = C.forward(np, g, w, np.zeros((2, 2, 4)))
    want = np.zeros_like(g)
    for t in range(5):
        for k in range(3):
            s = t - 2 + k
            if s >= 0:
                want[:, t] += w[:, k] * g[:, s]
    assert np.abs(y - want).max() < 1e-14
    assert np.array_equal(past, g[:, 3:])
    y1, p1 = C.forward(np, g[:, :1], w, np.zeros((2, 2, 4)))
    assert np.array_equal(p1, np.concatenate([np.zeros((2, 1, 4)), g[:, :1]], 1))


def test_reference_forms_agree():
    p, tok = _params(), _tokens(2, T)
    logits, state = RM.forward(SPEC, p, tok)
    st, outs = None, []
    for t in range(T):
        o, st = RM.step(SPEC, p, tok[:, t], st)
        outs.append(o)
    assert _rel(np.stack(outs, 1), logits) < 1e-12
    a, sa = RM.forward(SPEC, p, tok[:, :3])
    b, sb = RM.forward(SPEC, p, tok[:, 3:], sa)
    assert _rel(np.concatenate([a, b], 1), logits) < 1e-12
    for c, want in zip(sb["conv"], state["conv"], strict=True):
        assert _rel(c, want) < 1e-12
    # the conv matters: without it (zero weights: the identity is not a conv of zeros) the
    # logits differ
    zero = dict(p, **{n: np.zeros_like(a) for n, a in p.items() if ".conv." in n})
    assert _rel(RM.forward(SPEC, zero, tok)[0], logits) > 1e-3


def test_reference_refuses_a_state_without_conv():
    p, tok = _params(), _tokens(1, 2)
    st = RM.init_state(SPEC, 1, np.zeros(1))
    with pytest.raises(ValueError, match=r"state\['conv'\]"):
        RM.forward(SPEC, p, tok, {k: v for k, v in st.items() if k != "conv"})


def test_torch_matches_reference():
    p, tok = _params(), _tokens(2, T)
    ref, ref_state = RM.forward(SPEC, p, tok)
    m = memcore.realize(SPEC, backend="torch", params=p)
    x = torch.as_tensor(tok)
    with torch.no_grad():
        logits, state = m(x)
        assert _rel(logits, ref) < 1e-12
        a, sa = m(x[:, :5])
        b, sb = m(x[:, 5:], sa)
        assert _rel(torch.cat([a, b], 1), ref) < 1e-12
        st, outs = m.init_state(2), []
        for t in range(T):
            o, st = m.step(x[:, t], st, inplace=True)
            outs.append(o)
        assert _rel(torch.stack(outs, 1), ref) < 1e-12
        for c, want in zip(st["conv"], ref_state["conv"], strict=True):
            assert _rel(c, want) < 1e-12
        pos = torch.tensor([0, 9, 15])
        lp, _ = m(x, positions=pos)
        assert _rel(lp, ref.reshape(-1, 9)[[0, 9, 15]]) < 1e-12
    bad = {k: v for k, v in m.init_state(2).items() if k != "conv"}
    with pytest.raises(ValueError, match=r"state\['conv'\]"):
        m(x, bad)
    with pytest.raises(ValueError, match="positions must lie"):
        m(x, positions=torch.tensor([16]))


def test_torch_gradient_reaches_the_conv():
    m = memcore.realize(SPEC, backend="torch", params=_params())
    logits, _ = m(torch.as_tensor(_tokens(1, T)))
    logits.sum().backward()
    g = m.layers._modules["1"].conv.weight.grad
    assert g is not None and float(g.abs().sum()) > 0


@pytest.mark.parametrize("cu", [(0, 3, 4, 8), (0, 7, 8), (0, 1, 8), (0, 8)])
def test_packed_equals_separate(cu):
    p, row = _params(), _tokens(1, T, seed=3)
    cu32 = np.asarray(cu, dtype=np.int32)
    sep = [RM.forward(SPEC, p, row[:, a:b]) for a, b in zip(cu[:-1], cu[1:], strict=True)]
    want = np.concatenate([s[0] for s in sep], 1)
    ref, ref_state = RM.forward(SPEC, p, row, cu_seqlens=cu32)
    assert _rel(ref, want) < 1e-12
    m = memcore.realize(SPEC, backend="torch", params=p)
    with torch.no_grad():
        got, state = m(torch.as_tensor(row), cu_seqlens=torch.as_tensor(cu32))
    assert _rel(got, want) < 1e-12
    for c, r, s in zip(state["conv"], ref_state["conv"], sep[-1][1]["conv"], strict=True):
        assert np.abs(np.asarray(c) - s).max() < 1e-12 and np.abs(r - s).max() < 1e-12


def test_packed_conv_keeps_a_nan_in_its_document():
    from memcore.backends.torch import short_conv as TC
    from memcore.spec.reference import short_conv as C

    g = np.random.default_rng(0).normal(size=(1, 6, 2))
    g[0, 2] = np.nan  # the last token of the first document (0, 3)
    w = np.ones((2, 3))
    y, _ = C.forward(np, g, w, np.zeros((1, 2, 2)), (0, 3, 6))
    assert np.isnan(y[0, 2]).all() and np.isfinite(y[0, 3:]).all()
    yt, _ = TC.forward(torch.as_tensor(g), torch.as_tensor(w), torch.zeros(1, 2, 2), (0, 3, 6))
    assert torch.isnan(yt[0, 2]).all() and torch.isfinite(yt[0, 3:]).all()


def test_jax_matches_reference():
    p, tok = _params(), _tokens(2, T)
    ref, ref_state = RM.forward(SPEC, p, tok)
    m = memcore.realize(SPEC, backend="jax", params=p)
    logits, state = m(jnp.asarray(tok))
    assert logits.dtype == jnp.float64 and _rel(logits, ref) < 1e-12
    a, sa = m(jnp.asarray(tok[:, :5]), m.init_state(2, max_len=T))
    b, sb = m(jnp.asarray(tok[:, 5:]), sa)
    assert _rel(jnp.concatenate([a, b], 1), ref) < 1e-12
    st, outs = m.init_state(2, max_len=T), []
    for t in range(T):
        o, st = m.step(jnp.asarray(tok[:, t]), st)
        outs.append(o)
    assert _rel(jnp.stack(outs, 1), ref) < 1e-12
    back = m.to_reference_state(st)
    for c, want in zip(back["conv"], ref_state["conv"], strict=True):
        assert _rel(c, want) < 1e-12
    again = m.from_reference_state(ref_state, max_len=T + 1)
    o, _ = m.step(jnp.asarray(tok[:, 0]), again)
    assert _rel(o, RM.step(SPEC, p, tok[:, 0], ref_state)[0]) < 1e-12
    lp, _, _ = m.forward_aux(jnp.asarray(tok), positions=jnp.asarray([1, 8, 15]))
    assert _rel(lp, ref.reshape(-1, 9)[[1, 8, 15]]) < 1e-12
    bad = m.init_state(2)
    bad = type(bad)(bad.pos, {k: v for k, v in bad.arrays.items() if k != "conv"},
                    bad.spec_id, bad.growable)
    with pytest.raises(ValueError, match="conv"):
        m(jnp.asarray(tok), bad)
