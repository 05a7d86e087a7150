"""jax.grad, jax.vmap and jax.jit on every layer realization.

Gradients (with respect to parameters, input and the float arrays of the initial state) are
checked against the reference run on torch float64 with autograd, an independent oracle."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jaxcheck import F64_RTOL, LAYER_CASES, inputs, params64, ref_forward, rel_err
from memcore.backends.jax.realize import realize
from memcore.backends.jax.state import State
from memcore.spec.reference import layers as RL

from memcore import spec as S

GRAD_CASES = ["transformer_full", "transformer_window", "mamba", "bmojo_f", "bmojo",
              "mosaic", "mosaic_capacity", "persistent"]
PREFIX, T = 3, 4


def _torch_grads(spec, params, x, state):
    """Reference gradients of sum(y * w) + aux on torch float64."""
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = torch.tensor(x, requires_grad=True)
    ts = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            ts[k] = torch.tensor(v, requires_grad=True)
        elif isinstance(v, np.ndarray):
            ts[k] = torch.tensor(v)
        else:
            ts[k] = v
    y, _, aux = RL.forward_aux(spec, tp, tx, ts)
    w = torch.tensor(np.random.default_rng(5).standard_normal(tuple(y.shape)))
    loss = (y * w).sum() + (0 if aux is None else aux)
    loss.backward()
    gs = {k: (t.grad.numpy() if t.grad is not None else np.zeros(tuple(t.shape)))
          for k, t in ts.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    return {k: t.grad.numpy() for k, t in tp.items()}, tx.grad.numpy(), gs, w.numpy()


@pytest.mark.parametrize("name", GRAD_CASES)
def test_grad_matches_torch_reference(name):
    spec = LAYER_CASES[name]
    params = params64(spec)
    x = inputs(spec, 2, PREFIX + T, seed=4)
    _, s0, _ = ref_forward(spec, params, x[:, :PREFIX])
    gp_ref, gx_ref, gs_ref, w = _torch_grads(spec, params, x[:, PREFIX:], s0)

    layer = realize(spec, params)
    state = layer.from_reference_state(s0, max_len=PREFIX + T)
    floats = {k: a for k, a in state.arrays.items() if jnp.issubdtype(a.dtype, jnp.floating)}
    ints = {k: a for k, a in state.arrays.items() if k not in floats}

    def loss(p, xx, arrays):
        y, _, aux = realize(spec, p).forward_aux(xx, State(state.pos, {**arrays, **ints},
                                                        spec.spec_id))
        return jnp.sum(y * w) + (0.0 if aux is None else aux)

    jp = {k: jnp.asarray(v) for k, v in params.items()}
    gp, gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jp, jnp.asarray(x[:, PREFIX:]),
                                                             floats)
    for k in params:
        assert rel_err(gp[k], gp_ref[k]) <= F64_RTOL, k
    assert rel_err(gx, gx_ref) <= F64_RTOL
    # State gradients in the reference's layout (caches cut to the tokens held).
    got = layer.to_reference_state(State(state.pos, {**gs, **ints}, spec.spec_id))
    for k, want in gs_ref.items():
        if want.size and np.any(want):
            assert rel_err(got[k], want) <= F64_RTOL, k
        else:
            assert np.all(np.asarray(got[k]) == 0), k


VMAP_CASES = {**{n: LAYER_CASES[n] for n in GRAD_CASES},
              "jamba_model": S.jamba(4, 2, pattern="MA", vocab_size=5, d_state=2)}


@eqx.filter_jit
def _batched(layer, xs):
    return jax.vmap(lambda x: layer.forward_aux(x))(xs)


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vmap_under_jit_matches_reference(name):
    """vmap over a leading axis of independent batches, inside jit, per-slice reference."""
    spec = VMAP_CASES[name]
    params = params64(spec)
    xs = np.stack([inputs(spec, 2, 5, seed=s) for s in range(3)])
    ys, states, _ = _batched(realize(spec, params), jnp.asarray(xs))
    assert states.pos.shape == (3,)
    for i in range(3):
        y_ref, _, _ = ref_forward(spec, params, xs[i])
        assert rel_err(ys[i], y_ref) <= F64_RTOL
