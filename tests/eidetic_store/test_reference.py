"""The reference eidetic store (DESIGN 2.4) against a brute-force selection written here: per
chunk sort the candidates by (score desc, position desc) and keep ``select``; then keep the best
``capacity`` of the previous store and the picks, same order. Scores are drawn from a tiny set
so ties are common. Also: visibility of stored entries to queries, the bmojo layer's store, and
``memcore.ops``' store functions and innovation scores on numpy arrays."""

from __future__ import annotations

import numpy as np
import plain
from hypothesis import given
from hypothesis import strategies as st
from memcore.spec.reference import eidetic_store as store
from memcore.spec.reference import layers as L
from refcheck import assert_close, params64

from memcore import ops
from memcore import spec as S

TIES = st.sampled_from([0.0, 1.0, 2.0])


def order_key(entry):
    score, pos = entry
    return (-score, -pos)


def brute_force_stores(scores, chunk, select, capacity):
    """The store (a list of (score, pos), best first) after each complete chunk."""
    kept, out = [], []
    for c in range(len(scores) // chunk):
        cands = [(scores[p], p) for p in range(c * chunk, (c + 1) * chunk)]
        picks = sorted(cands, key=order_key)[:select]
        kept = sorted(kept + picks, key=order_key)[:capacity]
        out.append(list(kept))
    return out


def running_candidates(scores, chunk, select, t):
    """The running top ``select`` of t's chunk after token t."""
    c0 = (t // chunk) * chunk
    return sorted([(scores[p], p) for p in range(c0, t + 1)], key=order_key)[:select]


def entries(scores, positions, H=2, E=3):
    """An entry set for one batch row whose keys/values encode the position, so a gather
    that moves a key away from its position shows."""
    S_ = len(scores)
    pos = np.asarray(positions, dtype=np.int64)[None, :]
    k = np.broadcast_to(pos[0][None, :, None] * 10.0 + np.arange(E), (H, S_, E))[None] * 1.0
    return {"k": k.copy(), "v": -k.copy(), "score": np.asarray(scores, float)[None, :],
            "pos": pos}


def as_list(e):
    """Filled entries of row 0 in slot order, as (score, pos)."""
    return [(float(s), int(p)) for s, p in zip(e["score"][0], e["pos"][0], strict=True)
            if p >= 0]


def assert_slots(e, want, what):
    got = as_list(e)
    assert got == want, f"{what}: store {got} != brute force {want}"
    n = len(want)
    assert np.all(e["pos"][0, n:] == -1), f"{what}: slots after the filled ones must be empty"
    # keys and values travelled with their positions
    for i, (_, p) in enumerate(want):
        assert np.all(e["k"][0, :, i, :] == p * 10.0 + np.arange(e["k"].shape[-1])), what
        assert np.all(e["v"][0, :, i, :] == -(p * 10.0 + np.arange(e["v"].shape[-1]))), what


@st.composite
def store_cases(draw):
    chunk = draw(st.integers(1, 6))
    select = draw(st.one_of(st.just(0), st.just(chunk), st.integers(0, chunk)))
    capacity = draw(st.one_of(st.just(0), st.integers(0, 8)))
    n_chunks = draw(st.integers(1, 5))
    scores = draw(st.lists(TIES, min_size=chunk * n_chunks, max_size=chunk * n_chunks))
    return chunk, select, capacity, scores


@given(case=store_cases())
def test_store_functions_match_brute_force_after_every_chunk(case):
    chunk, select, capacity, scores = case
    want = brute_force_stores(scores, chunk, select, capacity)
    kept = store.empty(np, 1, 2, capacity, 3, np.float64, np.zeros(1))
    for c in range(len(want)):
        seg = range(c * chunk, (c + 1) * chunk)
        picks = store.top(np, entries([scores[p] for p in seg], list(seg)), select)
        kept = store.merge(np, kept, picks, capacity)
        assert_slots(kept, want[c], f"after chunk {c}")


@given(scores=st.lists(TIES, min_size=0, max_size=10), n=st.integers(0, 12),
       holes=st.lists(st.booleans(), min_size=10, max_size=10), data=st.data())
def test_top_orders_filled_then_score_then_position(scores, n, holes, data):
    """Empty slots (pos < 0) anywhere in the input go last; positions are arbitrary, not sorted."""
    positions = data.draw(st.permutations(range(100, 100 + len(scores))), label="positions")
    positions = [-1 if holes[i] else p for i, p in enumerate(positions)]
    e = entries(scores, positions)
    e["k"] = np.where(e["pos"][:, None, :, None] < 0, 0.0, e["k"])
    got = store.top(np, e, n)
    filled = [(s, p) for s, p in zip(scores, positions, strict=True) if p >= 0]
    want = sorted(filled, key=order_key)[:n]
    assert got["pos"].shape == (1, n)
    assert_slots(got, want, "top")


@given(a=st.lists(TIES, max_size=5), b=st.lists(TIES, max_size=5), c=st.lists(TIES, max_size=5),
       n=st.integers(0, 6))
def test_merge_is_associative(a, b, c, n):
    pa = list(range(0, len(a)))
    pb = list(range(10, 10 + len(b)))
    pc = list(range(20, 20 + len(c)))
    ea, eb, ec = entries(a, pa), entries(b, pb), entries(c, pc)
    left = store.merge(np, store.merge(np, ea, eb, n), ec, n)
    right = store.merge(np, ea, store.merge(np, eb, ec, n), n)
    assert as_list(left) == as_list(right)
    want = sorted(list(zip(a, pa, strict=True)) + list(zip(b, pb, strict=True))
                  + list(zip(c, pc, strict=True)), key=order_key)[:n]
    assert_slots(left, want, "merge")


# --- the bmojo layer's store -------------------------------------------------------------

def tie_inputs(levels, D):
    """x_t = sqrt(level_t) * ones(D): with fading=False the score mean(x_t^2) is level_t up to
    rounding, and equal levels give exactly equal scores."""
    return np.sqrt(np.asarray(levels, float))[None, :, None] * np.ones((1, 1, D))


def layer_scores(spec, p, x):
    """DESIGN 2.4's score written plainly: r_t = mean((x_t - s_{t-1} Wpred^T)^2), s_{-1} = 0."""
    if not spec.fading:
        return list(np.mean(x[0] ** 2, axis=-1))
    sub = {k[len("fading."):]: v for k, v in p.items() if k.startswith("fading.")}
    s = plain.mamba_block(spec.fading_block, sub, x)[0]
    s_prev = np.concatenate([np.zeros((1, spec.d_model)), s[:-1]])
    return list(np.mean((x[0] - s_prev @ p["pred_proj.weight"].T) ** 2, axis=-1))


@st.composite
def layer_cases(draw):
    H, E = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
    chunk = draw(st.integers(1, 5))
    spec = S.bmojo(H * E, H, window=draw(st.integers(1, 4)), chunk=chunk,
                   select=draw(st.integers(0, chunk)), capacity=draw(st.integers(0, 5)),
                   d_state=2, fading=draw(st.booleans()))
    T = draw(st.integers(1, 18))
    if spec.fading:
        x = np.random.default_rng(draw(st.integers(0, 999))).standard_normal((1, T, H * E))
    else:
        x = tie_inputs(draw(st.lists(TIES, min_size=T, max_size=T)), H * E)
    return spec, x


@given(case=layer_cases())
def test_layer_store_after_every_chunk_matches_brute_force(case):
    spec, x = case
    T, C, K, M = x.shape[1], spec.store.chunk, spec.store.select, spec.store.capacity
    p = params64(spec, 0)
    scores = layer_scores(spec, p, x)
    want = brute_force_stores(scores, C, K, M)
    state = None
    for t in range(T):
        _, state = L.step(spec, p, x[:, t], state)
        cands = running_candidates(scores, C, K, t) if (t + 1) % C else []
        got_c = [int(q) for q in state["cand_pos"][0] if q >= 0]
        assert got_c == [q for _, q in cands], f"candidates after token {t}"
        if (t + 1) % C == 0:
            kept = want[(t + 1) // C - 1]
            assert [int(q) for q in state["store_pos"][0] if q >= 0] == [q for _, q in kept], (
                f"streaming store after chunk {(t + 1) // C - 1}")
            assert_close(state["store_score"][0, :len(kept)], np.array([s for s, _ in kept]),
                         "store scores")
            _, par = L.forward(spec, p, x[:, :t + 1])
            assert np.array_equal(par["store_pos"], state["store_pos"]), (
                f"parallel store after chunk {(t + 1) // C - 1}")


@st.composite
def visibility_cases(draw):
    H, E = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
    chunk = draw(st.integers(1, 5))
    W = draw(st.integers(1, 5))
    T = draw(st.integers(2, 20))
    spec = S.bmojo(H * E, H, window=W, chunk=chunk, select=draw(st.integers(1, chunk)),
                   capacity=draw(st.integers(1, 5)), fading=False,
                   positions=draw(st.sampled_from(["rope", "none"])))
    rng = np.random.default_rng(draw(st.integers(0, 999)))
    x = rng.standard_normal((1, T, H * E))
    p_tok = draw(st.integers(0, T - 1))
    return spec, x, p_tok


@given(case=visibility_cases())
def test_a_stored_token_reaches_exactly_the_queries_that_may_see_it(case):
    """Negating x_p keeps its score (fading=False: mean(x_p^2)), so the selection is unchanged,
    and changes k_p and v_p. y_t may then change only where p is in t's raw window (p <= t <
    p + W) or where p is a visible store entry: p <= t - W and p in the store after chunk
    c(t) - 1. Everywhere else y_t must stay exactly as it was."""
    spec, x, p_tok = case
    T, W, C = x.shape[1], spec.window, spec.store.chunk
    params = params64(spec, 0)
    x2 = x.copy()
    x2[:, p_tok] = -x2[:, p_tok]
    stores = brute_force_stores(layer_scores(spec, params, x), C, spec.store.select,
                                spec.store.capacity)

    def may_change(t):
        if p_tok <= t < p_tok + W:
            return True
        c = t // C
        return t - W >= p_tok and c >= 1 and any(q == p_tok for _, q in stores[c - 1])

    for form in ("parallel", "streaming"):
        if form == "parallel":
            y1, _ = L.forward(spec, params, x)
            y2, _ = L.forward(spec, params, x2)
        else:
            y1 = np.stack([y for y in _stream(spec, params, x)], axis=1)
            y2 = np.stack([y for y in _stream(spec, params, x2)], axis=1)
        scale = np.max(np.abs(y1))
        for t in range(T):
            d = np.max(np.abs(y1[:, t] - y2[:, t]))
            if may_change(t):
                assert d > 1e-8 * scale, f"{form}: y_{t} ignores token {p_tok}"
            else:
                assert d <= 1e-12 * scale, (
                    f"{form}: y_{t} changed with token {p_tok} (window {W}, chunk {C}, "
                    f"stores {stores})")


def _stream(spec, params, x):
    state = None
    for t in range(x.shape[1]):
        y, state = L.step(spec, params, x[:, t], state)
        yield y


@given(case=visibility_cases())
def test_bmojo_without_fading_is_attention_over_window_and_visible_store(case):
    """y_t written plainly: one softmax over the raw window (t - W, t] and the store entries of
    the brute-force store after chunk c(t) - 1 with position <= t - W. A token inside the raw
    window must not be counted twice through the store."""
    spec, x, _ = case
    T, W, C, H, E = x.shape[1], spec.window, spec.store.chunk, spec.n_heads, spec.head_dim
    p = params64(spec, 0)
    stores = brute_force_stores(layer_scores(spec, p, x), C, spec.store.select,
                                spec.store.capacity)
    rope = spec.positions == "rope"
    q, k, v = (x[0] @ p[f"{n}_proj.weight"].T for n in "qkv")
    want = np.zeros((T, H * E))
    for t in range(T):
        c = t // C
        stored = [j for _, j in stores[c - 1] if j <= t - W] if c >= 1 else []
        js = [j for j in range(max(0, t - W + 1), t + 1)] + stored
        for h in range(H):
            sl = slice(h * E, (h + 1) * E)
            qt = plain.rope_vec(q[t, sl], t) if rope else q[t, sl]
            ks = [plain.rope_vec(k[j, sl], j) if rope else k[j, sl] for j in js]
            want[t, sl] = plain.softmax_readout([qt @ kj / np.sqrt(E) for kj in ks], v[js, sl])
    want = want @ p["o_proj.weight"].T
    y, _ = L.forward(spec, p, x)
    assert_close(y[0], want, "y (parallel vs plain window + store)")
    ys = np.stack(list(_stream(spec, p, x)), axis=1)
    assert_close(ys[0], want, "y (streaming vs plain window + store)")


@st.composite
def windowed_layer_cases(draw):
    H, E = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
    kw = dict(d_model=H * E, n_heads=H, window=draw(st.integers(1, 4)), d_state=2,
              fading=draw(st.booleans()), tie_fading=draw(st.booleans()),
              positions=draw(st.sampled_from(["rope", "none"])))
    if draw(st.booleans()):
        spec = S.bmojo_f(**kw)
    else:
        chunk = draw(st.integers(1, 4))
        spec = S.bmojo(chunk=chunk, select=draw(st.integers(0, chunk)),
                       capacity=draw(st.integers(0, 4)), **kw)
    T = draw(st.integers(1, 14))
    x = np.random.default_rng(draw(st.integers(0, 999))).standard_normal((2, T, H * E))
    return spec, x


@given(case=windowed_layer_cases())
def test_bmojo_layers_are_plain_window_fading_and_store(case):
    """bmojo_f and bmojo written plainly from DESIGN 2.3 and 2.4: raw window from x, fading
    window from the Mamba block's output (tied or own projections), store from the brute-force
    selection; the innovation loss is the mean score."""
    spec, x = case
    p = params64(spec, 1)
    stores = None
    if isinstance(spec, S.BMojo):
        st_ = spec.store
        stores, all_scores = [], []
        for b in range(x.shape[0]):
            sc = layer_scores(spec, p, x[b:b + 1])
            all_scores.append(sc)
            stores.append([[q for _, q in kept] for kept in
                           brute_force_stores(sc, st_.chunk, st_.select, st_.capacity)])
    y, _, aux = L.forward_aux(spec, p, x)
    assert_close(y, plain.windowed_layer(spec, p, x, stores), "y (layer vs plain)")
    if stores is not None:
        assert_close(aux, np.mean(all_scores), "aux loss (mean innovation score)")
    else:
        assert aux is None


# --- memcore.ops on numpy arrays ------------------------------------------------------------

def _rng(seed):
    return np.random.default_rng(seed)


seeds = st.integers(0, 2 ** 16)


@given(B=st.integers(1, 2), T=st.integers(1, 8), D=st.integers(1, 6), seed=seeds,
       pred=st.booleans())
def test_innovation_scores_op(B, T, D, seed, pred):
    r = _rng(seed)
    x, s_prev = r.standard_normal((B, T, D)), r.standard_normal((B, T, D))
    W = r.standard_normal((D, D)) if pred else None
    got = ops.innovation_scores(x, s_prev if pred else None, W)
    assert np.array_equal(got, store.innovation_scores(x, s_prev if pred else None, W))
    xhat = s_prev @ W.T if pred else 0.0
    assert_close(got, np.mean((x - xhat) ** 2, axis=-1), "innovation scores vs formula")



def test_store_ops_are_the_reference():
    r = _rng(0)
    a = {"k": r.standard_normal((1, 2, 4, 3)), "v": r.standard_normal((1, 2, 4, 3)),
         "score": np.array([[1.0, 2.0, 1.0, 0.0]]), "pos": np.array([[3, 5, 7, -1]])}
    b = {"k": r.standard_normal((1, 2, 2, 3)), "v": r.standard_normal((1, 2, 2, 3)),
         "score": np.array([[2.0, 1.0]]), "pos": np.array([[9, 8]])}
    top = ops.store_top(a, 3)
    assert top["pos"].tolist() == [[5, 7, 3]]
    assert np.array_equal(top["k"][:, :, 0], a["k"][:, :, 1])
    merged = ops.store_merge(a, b, 4)
    assert merged["pos"].tolist() == [[9, 5, 8, 7]]
    assert merged["score"].tolist() == [[2.0, 2.0, 1.0, 1.0]]
    assert np.array_equal(merged["v"][:, :, 2], b["v"][:, :, 1])
    assert ops.store_top(a, 5)["pos"].tolist() == [[5, 7, 3, -1, -1]]
