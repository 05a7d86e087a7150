"""Hypothesis strategies for specs and inputs, sized for property tests on a CPU.

    from hypothesis import given
    from memcore.testing import strategies as mst

    @given(mst.layer_specs(), mst.data())
    def test_mine(spec, data):
        x = data.draw(mst.sequences(spec))
        ...

Sizes stay small (d_model <= 12, T <= 24 by default) and deliberately awkward: odd head widths,
windows longer than the sequence, chunks longer than the sequence, capacity 0, select 0 and
select == chunk.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from memcore import spec as S

LAYER_NAMES = ("transformer", "mamba", "bmojo_f", "bmojo", "mosaic", "persistent")

data = st.data


@st.composite
def widths(draw, max_heads: int = 3, max_head_dim: int = 4):
    """(d_model, n_heads) with d_model = n_heads * head_dim; odd head widths included."""
    heads = draw(st.integers(1, max_heads))
    head_dim = draw(st.integers(1, max_head_dim))
    return heads * head_dim, heads


@st.composite
def layer_specs(draw, kinds=LAYER_NAMES, d_model: int | None = None, n_heads: int | None = None,
                max_heads: int = 3, max_head_dim: int = 4, max_window: int = 8,
                max_chunk: int = 8, max_capacity: int = 6, max_state: int = 3):
    """A layer spec of one of ``kinds``; ``d_model``/``n_heads`` fix the width when given."""
    kind = draw(st.sampled_from(tuple(kinds)))
    if d_model is None:
        d_model, n_heads = draw(widths(max_heads, max_head_dim))
    elif n_heads is None:
        n_heads = 1
    window = draw(st.integers(1, max_window))
    positions = draw(st.sampled_from(S.primitives.POSITIONS))
    d_state = draw(st.integers(1, max_state))
    if kind == "transformer":
        return S.transformer(d_model, n_heads, window=draw(st.none() | st.just(window)),
                             positions=positions)
    if kind == "mamba":
        return S.mamba(d_model, d_state=d_state, d_conv=draw(st.integers(1, 4)),
                       expand=draw(st.integers(1, 2)))
    common = dict(d_state=d_state, positions=positions, tie_fading=draw(st.booleans()),
                  fading=draw(st.booleans()), d_conv=draw(st.integers(1, 4)), expand=1)
    if kind == "bmojo_f":
        return S.bmojo_f(d_model, n_heads, window, **common)
    if kind == "bmojo":
        chunk = draw(st.integers(1, max_chunk))
        select = draw(st.integers(0, chunk))
        capacity = draw(st.integers(0, max_capacity))
        return S.bmojo(d_model, n_heads, window, chunk=chunk, select=select, capacity=capacity,
                       **common)
    if kind == "mosaic":
        return S.mosaic(d_model, n_heads,
                        capacity=draw(st.none() | st.integers(1, max_capacity)))
    if kind == "persistent":
        return S.persistent(d_model, n_heads, slots=draw(st.integers(1, 5)))
    raise ValueError(f"layer_specs: unknown kind {kind!r}; known: {LAYER_NAMES}")


@st.composite
def model_specs(draw, kinds=LAYER_NAMES[:-1], max_layers: int = 2, vocab_size: int = 11):
    """A small model: 1..max_layers mixers of one width, any FFN kind, either norm."""
    d_model, n_heads = draw(widths())
    n = draw(st.integers(1, max_layers))
    layers = [draw(layer_specs(kinds, d_model=d_model, n_heads=n_heads)) for _ in range(n)]
    ffn = draw(st.sampled_from(("mlp", "persistent", None)))
    if ffn == "persistent":
        ffn = S.persistent(d_model, n_heads, slots=draw(st.integers(1, 5)))
    return S.model(layers, vocab_size, ffn=ffn, norm=draw(st.sampled_from(("rms", "layer"))),
                   mlp_ratio=draw(st.integers(1, 2)))


@st.composite
def sequences(draw, spec, min_len: int = 1, max_len: int = 24, max_batch: int = 2,
              dtype=np.float64, scale: float = 1.0):
    """An input for ``spec`` as a numpy array: ``[B, T, d_model]`` floats for a layer,
    ``[B, T]`` token ids for a model."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(min_len, max_len))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if isinstance(spec, S.Model):
        return rng.integers(0, spec.vocab_size, size=(batch, length))
    return (scale * rng.standard_normal((batch, length, spec.d_model))).astype(dtype)


__all__ = ["LAYER_NAMES", "data", "widths", "layer_specs", "model_specs", "sequences"]
