"""``memcore.backends.jax.eidetic_store`` vs the reference: the store's exact order (ties
included), merges and innovation scores (through ``memcore.ops``), and the store a bmojo layer
keeps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxcheck import F64_RTOL, assert_states_close, params64, ref_forward, rel_err
from memcore.backends.jax import eidetic_store as jops
from memcore.backends.jax.realize import realize
from memcore.spec.reference import eidetic_store as ref_ops

import memcore.ops as O
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


def test_store_merge_and_scores_match_reference():
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape)

    def entries(pos):
        n = len(pos)
        return {"k": r(1, 2, n, 3), "v": r(1, 2, n, 3), "score": np.round(r(1, n)),
                "pos": np.array([pos], dtype=np.int64)}

    a, b = entries([3, -1, 7]), entries([1, 5])
    want = ref_ops.store_merge(a, b, 3)
    got = O.store_merge({f: jnp.asarray(x) for f, x in a.items()},
                        {f: jnp.asarray(x) for f, x in b.items()}, 3)
    for f in want:
        np.testing.assert_array_equal(np.asarray(got[f]), want[f])
    x, s, w = r(2, 4, 3), r(2, 4, 3), r(3, 3)
    got = O.innovation_scores(*(jnp.asarray(a) for a in (x, s, w)))
    assert rel_err(got, ref_ops.innovation_scores(x, s, w)) <= F64_RTOL
