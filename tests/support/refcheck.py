"""Shared pieces of the reference's tests: hypothesis strategies over tiny specs and inputs,
parameters in float64, a runner for both forms, and comparisons of outputs and states."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st
from memcore.spec.reference import layers as L
from memcore.spec.reference import model as M

import memcore
from memcore import spec as S

RTOL = 1e-10  # DESIGN 6: the reference's forms agree to 1e-10 in float64
MAX_T = 24

# --- strategies -------------------------------------------------------------------------------

heads_and_width = st.tuples(st.integers(1, 3), st.integers(1, 4))  # (H, E): odd E included
positions_st = st.sampled_from(["rope", "none"])


@st.composite
def transformer_specs(draw, window="draw"):
    H, E = draw(heads_and_width)
    w = draw(st.one_of(st.none(), st.integers(1, 8))) if window == "draw" else window
    return S.transformer(H * E, H, window=w, positions=draw(positions_st))


@st.composite
def mamba_specs(draw, d_model=None):
    D = draw(st.integers(1, 8)) if d_model is None else d_model
    return S.mamba(D, d_state=draw(st.integers(1, 4)), d_conv=draw(st.integers(1, 4)),
                   expand=draw(st.integers(1, 2)),
                   dt_rank=draw(st.one_of(st.just("auto"), st.integers(1, 3))))


def _bmojo_common(draw):
    H, E = draw(heads_and_width)
    return dict(d_model=H * E, n_heads=H, window=draw(st.integers(1, 6)),
                d_state=draw(st.integers(1, 3)), positions=draw(positions_st),
                tie_fading=draw(st.booleans()), fading=draw(st.booleans()),
                d_conv=draw(st.integers(1, 4)), expand=draw(st.integers(1, 2)))


@st.composite
def bmojo_f_specs(draw, fading=None, tie_fading=None):
    kw = _bmojo_common(draw)
    if fading is not None:
        kw["fading"] = fading
    if tie_fading is not None:
        kw["tie_fading"] = tie_fading
    return S.bmojo_f(**kw)


@st.composite
def bmojo_specs(draw, fading=None):
    kw = _bmojo_common(draw)
    if fading is not None:
        kw["fading"] = fading
    chunk = draw(st.integers(1, 7))
    # select = 0 and select = chunk are the edges of the allowed range; capacity 0 empties it.
    select = draw(st.one_of(st.just(0), st.just(chunk), st.integers(0, chunk)))
    capacity = draw(st.one_of(st.just(0), st.integers(0, 5)))
    return S.bmojo(chunk=chunk, select=select, capacity=capacity, **kw)


@st.composite
def mosaic_specs(draw, capacity="draw"):
    H, E = draw(heads_and_width)
    cap = draw(st.one_of(st.none(), st.integers(1, 6))) if capacity == "draw" else capacity
    return S.mosaic(H * E, H, capacity=cap)


@st.composite
def persistent_specs(draw):
    H, E = draw(heads_and_width)
    return S.persistent(H * E, H, slots=draw(st.integers(1, 5)))


@st.composite
def layer_specs_of_width(draw, D, H):
    kind = draw(st.sampled_from(["transformer", "mamba", "bmojo_f", "bmojo", "mosaic"]))
    if kind == "transformer":
        return S.transformer(D, H, window=draw(st.one_of(st.none(), st.integers(1, 5))),
                             positions=draw(positions_st))
    if kind == "mamba":
        return draw(mamba_specs(d_model=D))
    if kind == "mosaic":
        return S.mosaic(D, H, capacity=draw(st.one_of(st.none(), st.integers(1, 4))))
    kw = dict(d_model=D, n_heads=H, window=draw(st.integers(1, 4)), d_state=2,
              fading=draw(st.booleans()), tie_fading=draw(st.booleans()))
    if kind == "bmojo_f":
        return S.bmojo_f(**kw)
    chunk = draw(st.integers(1, 4))
    return S.bmojo(chunk=chunk, select=draw(st.integers(0, chunk)),
                   capacity=draw(st.integers(0, 3)), **kw)


@st.composite
def model_specs(draw):
    H, E = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
    D = H * E
    layers = draw(st.lists(layer_specs_of_width(D, H), min_size=1, max_size=2))
    ffn = draw(st.sampled_from(["mlp", "persistent", None]))
    return S.model(layers, vocab_size=draw(st.integers(2, 7)), ffn=ffn, mlp_ratio=2,
                   norm=draw(st.sampled_from(["rms", "layer"])))


@st.composite
def jamba_specs(draw):
    H, E = draw(st.tuples(st.integers(1, 2), st.integers(1, 3)))
    pattern = draw(st.text(alphabet="MA", min_size=1, max_size=3))
    return S.jamba(H * E, H, pattern=pattern, vocab_size=draw(st.integers(2, 7)),
                   d_state=draw(st.integers(1, 3)),
                   window=draw(st.one_of(st.none(), st.integers(1, 4))),
                   ffn=draw(st.sampled_from(["mlp", None])))


@st.composite
def scan_cases(draw):
    Bt = draw(st.integers(1, 2))
    G = draw(st.sampled_from([None, 1, 2, 3]))
    Dc = draw(st.integers(1, 3)) * (G or 1)
    N = draw(st.integers(1, 4))
    T = draw(st.integers(1, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    u, delta, z = (rng.standard_normal((Bt, Dc, T)) for _ in range(3))
    A = -np.exp(rng.standard_normal((Dc, N)))
    bc_shape = (Bt, N, T) if G is None else (Bt, G, N, T)
    Bm, Cm = rng.standard_normal(bc_shape), rng.standard_normal(bc_shape)
    opt = dict(
        D=rng.standard_normal(Dc) if draw(st.booleans()) else None,
        z=z if draw(st.booleans()) else None,
        delta_bias=rng.standard_normal(Dc) if draw(st.booleans()) else None,
        delta_softplus=draw(st.booleans()),
    )
    if not opt["delta_softplus"]:
        # a negative step dt = delta + delta_bias would make exp(dt A) grow
        delta = np.abs(delta)
        if opt["delta_bias"] is not None:
            opt["delta_bias"] = np.abs(opt["delta_bias"])
    h0 = rng.standard_normal((Bt, Dc, N)) if draw(st.booleans()) else None
    return (u, delta, A, Bm, Cm), opt, h0


# Every realization the acceptance list names, as (id, strategy).
REALIZATIONS = [
    ("transformer_full", transformer_specs(window=None)),
    ("transformer_windowed", st.integers(1, 8).flatmap(lambda w: transformer_specs(window=w))),
    ("mamba", mamba_specs()),
    ("bmojo_f_fading_tied", bmojo_f_specs(fading=True, tie_fading=True)),
    ("bmojo_f_fading_untied", bmojo_f_specs(fading=True, tie_fading=False)),
    ("bmojo_f_no_fading", bmojo_f_specs(fading=False)),
    ("bmojo", bmojo_specs()),
    ("bmojo_no_fading", bmojo_specs(fading=False)),
    ("mosaic_unbounded", mosaic_specs(capacity=None)),
    ("mosaic_capacity", st.integers(1, 6).flatmap(lambda c: mosaic_specs(capacity=c))),
    ("persistent", persistent_specs()),
    ("model", model_specs()),
    ("jamba", jamba_specs()),
]

# One test per realization: the decorated test takes the realization's strategy as spec_st.
each_realization = pytest.mark.parametrize(
    "spec_st", [s for _, s in REALIZATIONS], ids=[name for name, _ in REALIZATIONS])


def is_model(spec) -> bool:
    return isinstance(spec, S.Model)


def params64(spec, seed: int = 0, jitter: float = 0.1, offset: int = 12345) -> dict:
    """``memcore.init`` in float64 plus a small random perturbation (drawn from seed + offset),
    so constant initial values (D = 1, equal scales per head) cannot hide a wrong index."""
    p = memcore.init(spec, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + offset)
    return {k: v + jitter * rng.standard_normal(v.shape) for k, v in p.items()}


def inputs(spec, B: int, T: int, seed: int = 0, tokens=np.int64):
    """A float64 [B, T, D] input, or [B, T] tokens of dtype ``tokens`` for a model spec."""
    rng = np.random.default_rng(seed)
    if is_model(spec):
        return rng.integers(0, spec.vocab_size, size=(B, T)).astype(tokens)
    return rng.standard_normal((B, T, spec.d_model))


# --- running both forms --------------------------------------------------------------------

def forward(spec, params, x, state=None):
    return (M.forward if is_model(spec) else L.forward)(spec, params, x, state)


def step(spec, params, x_t, state=None):
    return (M.step if is_model(spec) else L.step)(spec, params, x_t, state)


def fold(spec, params, x, state=None):
    """Streaming form folded over x's time axis: (the list of step outputs, final state)."""
    ys = []
    for t in range(x.shape[1]):
        y_t, state = step(spec, params, x[:, t], state)
        ys.append(y_t)
    return ys, state


# --- comparisons ------------------------------------------------------------------------------

def to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu()
    return np.asarray(a)


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (0 when both are all zero; inf on a shape mismatch)."""
    g, w = to_numpy(got), to_numpy(want)
    if g.shape != w.shape:
        return float("inf")
    if g.size == 0:
        return 0.0
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(w))):
        return float("inf")  # NaN never passes
    diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
    scale = float(np.max(np.abs(w.astype(np.float64))))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def assert_close(got, want, what: str, rtol: float = RTOL) -> None:
    err = rel_err(got, want)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def assert_states_equal(got, want, what: str = "state", rtol: float = RTOL) -> None:
    """Every entry of two states: metadata equal, integer arrays equal, float arrays close."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{what}: expected a dict, got {type(got).__name__}"
        assert set(got) == set(want), f"{what}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_states_equal(got[k], want[k], f"{what}[{k!r}]", rtol)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), f"{what}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_states_equal(g, w, f"{what}[{i}]", rtol)
    elif isinstance(want, (int, str)):
        assert got == want, f"{what}: {got!r} != {want!r}"
    else:
        g, w = to_numpy(got), to_numpy(want)
        assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{what}: dtype {g.dtype} != {w.dtype}"
        if np.issubdtype(w.dtype, np.integer) or w.dtype == bool:
            assert np.array_equal(g, w), f"{what}: integer arrays differ:\n{g}\n{w}"
        else:
            assert_close(g, w, what, rtol)


def assert_fold_matches(spec, params, x, y, state, where: str = "") -> None:
    """The streaming form folded over x gives the parallel form's y and final state."""
    ys, state_s = fold(spec, params, x)
    assert_close(np.stack([to_numpy(v) for v in ys], axis=1), y, f"y (fold of step{where})")
    assert_states_equal(state_s, state, f"final state (fold of step{where})")


def assert_split_matches(spec, params, x, a, y, state, where: str = "") -> None:
    """forward(x[:, :a]) then forward(x[:, a:], its state) gives the whole call's y and final
    state."""
    y1, s1 = forward(spec, params, x[:, :a])
    y2, s2 = forward(spec, params, x[:, a:], s1)
    assert_close(np.concatenate([to_numpy(y1), to_numpy(y2)], axis=1), y,
                 f"y (split at {a}{where})")
    assert_states_equal(s2, state, f"final state (split at {a}{where})")
