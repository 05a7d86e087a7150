"""Bad spec arguments and bad spec JSON raise errors that name the argument."""

from __future__ import annotations

import pytest

from memcore import spec as S


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda: S.transformer(8, 2, window=-1), ValueError, r"transformer: window must be >= 1"),
    (lambda: S.transformer(8, 2, window=0), ValueError, r"window must be >= 1, got 0"),
    (lambda: S.bmojo_f(8, 2, window=-3), ValueError, r"bmojo_f: window must be >= 1"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=4, capacity=2), ValueError,
     r"bmojo: select must be <= 3, got 4"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=-1, capacity=2), ValueError,
     r"select must be >= 0"),
    (lambda: S.bmojo(8, 2, 4, chunk=0, select=0, capacity=2), ValueError,
     r"chunk must be >= 1"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=1, capacity=-1), ValueError,
     r"capacity must be >= 0"),
    (lambda: S.transformer(7, 2), ValueError, r"d_model=7 is not divisible by n_heads=2"),
    (lambda: S.mosaic(6, 4), ValueError, r"d_model=6 is not divisible by n_heads=4"),
    (lambda: S.transformer(8, 2, positions="alibi"), ValueError,
     r"positions must be one of \('rope', 'none'\), got 'alibi'"),
    (lambda: S.bmojo_f(8, 2, 4, positions="abs"), ValueError, r"positions must be one of"),
    (lambda: S.transformer(8, 2, window=True), TypeError, r"window must be an int or None, "
                                                          r"got True \(bool\)"),
    (lambda: S.mamba(True), TypeError, r"mamba: d_model must be an int, got True"),
    (lambda: S.bmojo(8, 2, 4, chunk=3, select=True, capacity=2), TypeError,
     r"select must be an int, got True"),
    (lambda: S.mosaic(8, 2, capacity=False), TypeError, r"capacity must be an int or None"),
    (lambda: S.bmojo_f(8, 2, 4, fading=1), TypeError, r"fading must be a bool, got 1"),
    (lambda: S.bmojo_f(8, 2, 4, tie_fading="yes"), TypeError, r"tie_fading must be a bool"),
    (lambda: S.bmojo_f(8, 2, 4, d_state=0), ValueError, r"bmojo_f: d_state must be >= 1"),
    (lambda: S.mamba(8, dt_rank="big"), TypeError, r"dt_rank must be an int"),
    (lambda: S.persistent(8, 2, slots=0), ValueError, r"slots must be >= 1"),
    (lambda: S.transformer(8.0, 2), TypeError, r"d_model must be an int, got 8.0"),
    (lambda: S.jamba(8, 2, pattern="MXA"), ValueError,
     r"jamba: pattern must be a non-empty string of 'M' and 'A', got 'MXA'"),
    (lambda: S.jamba(8, 2, pattern=""), ValueError, r"pattern must be a non-empty string"),
    (lambda: S.jamba(8, 2, pattern=None), ValueError, r"pattern must be a non-empty string"),
    (lambda: S.jamba(8, 2, n_layers=0), ValueError, r"n_layers must be >= 1"),
    (lambda: S.model([], 5), ValueError, r"layers must be a non-empty sequence"),
    (lambda: S.model([S.transformer(4, 2), S.mamba(6)], 5), ValueError,
     r"layers\[1\].d_model=6 differs from layers\[0\].d_model=4"),
    (lambda: S.model(["mamba"], 5), TypeError, r"layers\[0\] must be a layer spec"),
    (lambda: S.model([S.mamba(4)], 0), ValueError, r"vocab_size must be >= 1"),
    (lambda: S.model([S.mamba(4)], 5, ffn="moe"), ValueError, r"ffn must be 'mlp'"),
    (lambda: S.model([S.mamba(4)], 5, norm="batch"), ValueError, r"norm must be one of"),
    (lambda: S.model([S.mamba(4)], 5, ffn=S.persistent(6, 2, 3)), ValueError,
     r"ffn.d_model=6 differs"),
])
def test_invalid_spec_arguments(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_spec_json_errors():
    with pytest.raises(ValueError, match=r"unknown kind 'nope'"):
        S.from_json('{"kind": "nope"}')
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        S.from_json('{"kind": "mamba", "d_model": 4, "colour": 1}')
    with pytest.raises(ValueError, match=r"not valid JSON"):
        S.from_json("{")
    with pytest.raises(ValueError, match=r"window must be >= 1"):
        S.from_json('{"kind": "transformer", "d_model": 4, "n_heads": 2, "window": -2}')
