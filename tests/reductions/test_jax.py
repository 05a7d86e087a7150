"""The required reductions (DESIGN 3) on the JAX backend: bmojo with capacity 0 equals bmojo_f,
bmojo_f without fading equals transformer(window), transformer(None) equals plain causal
softmax attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxcheck import F64_RTOL, params64, rel_err
from memcore.backends.jax.realize import realize

from memcore import spec as S


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
