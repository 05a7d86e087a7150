"""Gradients of the torch layers vs the reference run on torch float64 tensors: with respect
to every parameter, the input and the initial state, through outputs, final states and the
bmojo aux loss, in both forms."""

from __future__ import annotations

import pytest
import torch
from memcore.spec.reference import layers as RL
from torchcheck import F64, LAYER_CASES, detach_state, inputs, realize64, rel

GRAD_TOL = F64


def _float_arrays(state):
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _with_grad(state):
    out = dict(state)
    for k, v in _float_arrays(state).items():
        out[k] = v.detach().clone().requires_grad_(True)
    return out


def _loss(y, state, aux, weights):
    """A generic scalar: random projections of the output and of every final state array."""
    total = (y * weights["y"]).sum()
    for k, v in _float_arrays(state).items():
        if k in weights and v.shape == weights[k].shape:
            total = total + (v * weights[k]).sum()
    return total if aux is None else total + 3.0 * aux


def _weights(y, state, seed):
    g = torch.Generator().manual_seed(seed)
    w = {"y": torch.randn(y.shape, generator=g, dtype=torch.float64)}
    for k, v in _float_arrays(state).items():
        w[k] = torch.randn(v.shape, generator=g, dtype=torch.float64)
    return w


def _run(streaming, fn_forward, fn_step, x, state):
    if not streaming:
        return fn_forward(x, state)
    ys, aux = [], None
    for t in range(x.shape[1]):
        y, state, a = fn_step(x[:, t], state)
        ys.append(y)
        if a is not None:
            aux = a if aux is None else aux + a
    return torch.stack(ys, 1), state, aux


@pytest.mark.parametrize("streaming", [False, True], ids=["parallel", "streaming"])
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_gradients_match_reference(name, streaming):
    spec = LAYER_CASES[name]
    layer, params = realize64(spec)
    T = 6 if streaming else 9
    x0 = inputs(spec, 2, 5, seed=1)
    # A non-trivial initial state (from a prefix), so its gradient means something.
    _, s0 = layer(x0)
    s0 = detach_state(s0)
    x = inputs(spec, 2, T, seed=2)

    # torch backend
    xb = x.clone().requires_grad_(True)
    sb = _with_grad(s0)

    def fwd(xx, ss):
        return layer.forward_aux(xx, ss)

    def stp(xx, ss):
        return layer.step_aux(xx, ss)

    y, s, aux = _run(streaming, fwd, stp, xb, sb)
    w = _weights(y, s, 3)
    layer.zero_grad()
    _loss(y, s, aux, w).backward()

    # reference on torch tensors with autograd
    rp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xr = x.clone().requires_grad_(True)
    sr = _with_grad(s0)
    yr, s_r, aux_r = _run(streaming, lambda a, b: RL.forward_aux(spec, rp, a, b),
                          lambda a, b: RL.step_aux(spec, rp, a, b), xr, sr)
    _loss(yr, s_r, aux_r, w).backward()

    assert rel(y, yr) <= F64
    assert rel(xb.grad, xr.grad) <= GRAD_TOL, "input gradient"
    for k, v in _float_arrays(sb).items():
        gb, gr = v.grad, sr[k].grad
        if gr is None:
            assert gb is None or not gb.abs().any(), f"state[{k}] gradient"
            continue
        assert gb is not None, f"state[{k}] has no gradient"
        assert rel(gb, gr) <= GRAD_TOL, f"state[{k}] gradient"
    for pname, p in layer.named_parameters():
        gr = rp[pname].grad
        if gr is None:
            assert p.grad is None or not p.grad.abs().any(), pname
            continue
        assert p.grad is not None, f"{pname} has no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert rel(p.grad, gr) <= GRAD_TOL, f"gradient of {pname}"
