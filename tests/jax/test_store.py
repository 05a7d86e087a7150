"""The eidetic store's exact order (ties included) and the required reductions (DESIGN 3):
bmojo with capacity 0 equals bmojo_f, bmojo_f without fading equals transformer(window),
transformer(None) equals plain causal softmax attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxcheck import F64_RTOL, assert_states_close, params64, ref_forward, rel_err
from memcore.backends.jax import ops as jops
from memcore.backends.jax.realize import realize
from memcore.spec.reference import ops as ref_ops

from memcore import spec as S

S_SLOTS = 6


@st.composite
def entry_sets(draw):
    """Scores from a tiny set (many ties), distinct positions, some empty slots."""
    B, H, E = 2, 1, 2
    scores = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=B * S_SLOTS,
                           max_size=B * S_SLOTS))
    perm = draw(st.permutations(list(range(20))))
    empty = draw(st.lists(st.booleans(), min_size=B * S_SLOTS, max_size=B * S_SLOTS))
    pos = np.array(perm[:B * S_SLOTS]).reshape(B, S_SLOTS)
    pos = np.where(np.array(empty).reshape(B, S_SLOTS), -1, pos)
    rng = np.random.default_rng(draw(st.integers(0, 9)))
    filled = (pos >= 0)
    k = rng.standard_normal((B, H, S_SLOTS, E)) * filled[:, None, :, None]
    v = rng.standard_normal((B, H, S_SLOTS, E)) * filled[:, None, :, None]
    score = np.array(scores).reshape(B, S_SLOTS) * filled
    return {"k": k, "v": v, "score": score, "pos": pos.astype(np.int64)}


@settings(max_examples=25)
@given(entries=entry_sets(), n=st.sampled_from([0, 1, 4, S_SLOTS, S_SLOTS + 2]))
def test_store_top_order_matches_reference_with_ties(entries, n):
    want = ref_ops.store_top(entries, n)
    got = jops.store_top({f: jnp.asarray(a) for f, a in entries.items()}, n)
    np.testing.assert_array_equal(np.asarray(got["pos"]), want["pos"])
    for f in ("k", "v", "score"):
        np.testing.assert_array_equal(np.asarray(got[f]), want[f])


def test_store_keeps_later_of_tied_tokens():
    """Repeated tokens have equal scores (no fading: r_t = mean(x_t^2)); the store must keep
    the later ones, exactly as the reference."""
    spec = S.bmojo(4, 2, window=1, chunk=3, select=2, capacity=3, fading=False)
    params = params64(spec)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 4))
    x = rows[np.array([0, 1, 0, 1, 2, 0, 1, 1, 2])][None]
    _, s_ref, _ = ref_forward(spec, params, x)
    layer = realize(spec, params)
    _, state = layer(jnp.asarray(x))
    got = layer.to_reference_state(state)
    np.testing.assert_array_equal(got["store_pos"], s_ref["store_pos"])
    assert_states_close(got, s_ref)


def _x(D, T=7, seed=0):
    return np.random.default_rng(seed).standard_normal((2, T, D))


def test_bmojo_capacity0_equals_bmojo_f():
    kw = dict(d_model=6, n_heads=2, window=2, d_state=2)
    spec_f = S.bmojo_f(**kw)
    spec_b = S.bmojo(chunk=3, select=2, capacity=0, **kw)
    pb = params64(spec_b)
    pf = {k: v for k, v in pb.items() if k != "pred_proj.weight"}
    x = jnp.asarray(_x(6))
    yb, _ = realize(spec_b, pb)(x)
    yf, _ = realize(spec_f, pf)(x)
    assert rel_err(yb, yf) <= F64_RTOL


def test_bmojo_f_without_fading_equals_windowed_transformer():
    spec_f = S.bmojo_f(6, 2, window=3, fading=False)
    spec_t = S.transformer(6, 2, window=3)
    p = params64(spec_t)
    x = jnp.asarray(_x(6, seed=1))
    assert rel_err(realize(spec_f, p)(x)[0], realize(spec_t, p)(x)[0]) <= F64_RTOL


def test_full_transformer_is_causal_softmax_attention():
    spec = S.transformer(6, 2, window=None, positions="none")
    p = params64(spec)
    x = _x(6, T=9, seed=2)
    y, _ = realize(spec, p)(jnp.asarray(x))
    B, T, D, H = 2, 9, 6, 2
    E = D // H

    def heads(w):
        return (x @ p[w].T).reshape(B, T, H, E).transpose(0, 2, 1, 3)

    q, k, v = heads("q_proj.weight"), heads("k_proj.weight"), heads("v_proj.weight")
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(E)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = (w / w.sum(-1, keepdims=True)) @ v
    want = o.transpose(0, 2, 1, 3).reshape(B, T, D) @ p["o_proj.weight"].T
    assert rel_err(y, want) <= F64_RTOL
