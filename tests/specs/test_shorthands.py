"""The shorthand constructors of ``memcore.spec`` take the layer specs' newer fields and give the
same specs as the classes."""

import memcore.spec as S
import pytest


def test_transformer_shorthand_takes_grouped_heads_and_rope_theta():
    got = S.transformer(32, 4, window=5, n_kv_heads=2, rope_theta=1e6)
    assert got == S.Transformer(32, 4, 5, n_kv_heads=2, rope_theta=1e6)
    assert got.n_kv_heads == 2 and got.rope_theta == 1e6
    assert S.transformer(32, 4).to_json() == S.Transformer(32, 4).to_json()


def test_mamba_shorthand_takes_inner_norm_eps():
    assert S.mamba(16, inner_norm_eps=1e-6) == S.Mamba(16, inner_norm_eps=1e-6)
    assert S.mamba(16).inner_norm_eps is None


def test_shorthand_refuses_bad_grouping_by_name():
    with pytest.raises(ValueError, match="n_kv_heads"):
        S.transformer(32, 4, n_kv_heads=3)
