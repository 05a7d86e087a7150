"""Dispatch of ``memcore.kernels.pallas.api``: the device rule, the MEMCORE_KERNELS override,
and the entry points' states against the reference (a split forward through the kernels equals
one reference pass)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
from memcore.kernels.pallas import api  # noqa: E402
from memcore.spec.reference import ops as reference  # noqa: E402
from pallascheck import ON_GPU, rel_rmse  # noqa: E402


def test_device_rule(monkeypatch):
    monkeypatch.delenv(api.ENV, raising=False)
    x = jnp.zeros(3)
    assert api.kernels_enabled(x) == ON_GPU
    assert not api.kernels_enabled(np.zeros(3))  # not a JAX array
    monkeypatch.setenv(api.ENV, "pallas")
    assert api.kernels_enabled(x)
    monkeypatch.setenv(api.ENV, "jax")
    assert not api.kernels_enabled(x)
    # inside jit the decision is made from the tracer, on the default backend
    monkeypatch.delenv(api.ENV)
    assert bool(jax.jit(lambda a: jnp.asarray(api.kernels_enabled(a)))(x)) == ON_GPU
    monkeypatch.setenv(api.ENV, "cuda")
    with pytest.raises(ValueError, match="MEMCORE_KERNELS must be one of"):
        api.kernels_enabled(x)


def test_selective_scan_both_paths(monkeypatch):
    r = np.random.default_rng(0)
    Bt, Dc, T, N = 1, 3, 10, 2
    x = dict(u=r.standard_normal((Bt, Dc, T)), delta=r.standard_normal((Bt, Dc, T)),
             A=-np.exp(r.standard_normal((Dc, N))), B=r.standard_normal((Bt, N, T)),
             C=r.standard_normal((Bt, N, T)), initial_state=r.standard_normal((Bt, Dc, N)))
    x = {k: jnp.asarray(a) for k, a in x.items()}
    y0, h0 = reference.selective_scan(**x, delta_softplus=True, return_final_state=True)
    for mode in api.CHOICES:
        monkeypatch.setenv(api.ENV, mode)
        y, h = api.selective_scan(**x, delta_softplus=True, return_final_state=True)
        assert rel_rmse(y, y0) <= 1e-9 and rel_rmse(h, h0) <= 1e-9, mode


@pytest.mark.parametrize("window,fading,split", [(4, True, 3), (3, False, 7), (None, False, 5)])
def test_windowed_attention_split_through_kernel(monkeypatch, window, fading, split):
    monkeypatch.setenv(api.ENV, "pallas")
    r = np.random.default_rng(1)
    q, k, v, fk, fv = (jnp.asarray(r.standard_normal((1, 13, 2, 3))) for _ in range(5))
    if not fading:
        fk = fv = None
    want, want_state = reference.windowed_attention(q, k, v, window, fk, fv,
                                                    return_final_state=True)

    def part(a, sl):
        return None if a is None else a[:, sl]

    first, last = slice(0, split), slice(split, None)
    o1, s = api.windowed_attention(*(part(a, first) for a in (q, k, v)), window,
                                   part(fk, first), part(fv, first), return_final_state=True)
    o2, s = api.windowed_attention(*(part(a, last) for a in (q, k, v)), window,
                                   part(fk, last), part(fv, last), initial_state=s,
                                   return_final_state=True)
    assert rel_rmse(jnp.concatenate([o1, o2], axis=1), want) <= 1e-9
    assert s["pos"] == want_state["pos"]
    for name in set(want_state) - {"pos"}:
        assert rel_rmse(s[name], want_state[name]) <= 1e-9, name


def test_bmojo_attention_both_paths(monkeypatch):
    r = np.random.default_rng(2)
    B, T, H, E, S, M = 1, 10, 1, 3, 3, 2
    q, k, v, fk, fv = (jnp.asarray(r.standard_normal((B, T, H, E))) for _ in range(5))
    sk, sv = (jnp.asarray(r.standard_normal((B, H, S, M, E))) for _ in range(2))
    spos = jnp.asarray([[[-1, -1], [0, 2], [3, 1]]])
    outs = {}
    for mode in api.CHOICES:
        monkeypatch.setenv(api.ENV, mode)
        outs[mode] = api.bmojo_attention(q, k, v, 2, fk, fv, sk, sv, spos, chunk=4)
    assert rel_rmse(outs["pallas"], outs["jax"]) <= 1e-9
    # the store is seen: without it the result differs
    assert rel_rmse(api.bmojo_attention(q, k, v, 2, fk, fv), outs["jax"]) > 1e-3


def test_bmojo_attention_key_start_both_paths(monkeypatch):
    # 4 queries after 6 cached keys at pos 3: the first 3 keys sit before position 0
    r = np.random.default_rng(3)
    q = jnp.asarray(r.standard_normal((1, 4, 1, 3)))
    k, v, fk, fv = (jnp.asarray(r.standard_normal((1, 10, 1, 3))) for _ in range(4))
    outs = {}
    for mode in api.CHOICES:
        monkeypatch.setenv(api.ENV, mode)
        outs[mode] = api.bmojo_attention(q, k, v, 3, fk, fv, pos=3, key_start=3)
    assert rel_rmse(outs["pallas"], outs["jax"]) <= 1e-9
    cut = api.bmojo_attention(q, *(a[:, 3:] for a in (k, v)), 3, *(a[:, 3:] for a in (fk, fv)),
                              pos=3)
    assert rel_rmse(outs["jax"], cut) <= 1e-9  # the same as the keys never given
    assert rel_rmse(api.bmojo_attention(q, k, v, 3, fk, fv, pos=3), outs["jax"]) > 1e-3
