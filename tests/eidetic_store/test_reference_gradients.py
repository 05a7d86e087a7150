"""Gradients through the reference eidetic store (DESIGN 2.4): into stored keys and values,
and from the innovation loss into the predictor, on torch float64 tensors."""

from __future__ import annotations

import pytest
from memcore.spec.reference import layers as L
from refcheck import forward, inputs, params64

from memcore import spec as S

torch = pytest.importorskip("torch", reason="torch is needed for autograd")


def test_store_keys_and_values_carry_gradient():
    """DESIGN 2.4: gradients flow into stored keys and values. With window 1 and a store that
    keeps every token, y at the last position depends on x_0 only through the store."""
    spec = S.bmojo(4, 2, window=1, chunk=1, select=1, capacity=8, fading=False)
    p = params64(spec, 0)
    x = torch.from_numpy(inputs(spec, 1, 5, 0)).requires_grad_()
    y, _ = forward(spec, p, x)
    (g,) = torch.autograd.grad(y[0, -1].sum(), x)
    assert float(g[0, 0].abs().max()) > 0, "no gradient reaches a stored token"
    assert torch.all(torch.isfinite(g))


@pytest.mark.parametrize("streaming", [False, True])
def test_innovation_loss_trains_the_predictor(streaming):
    """DESIGN 2.4: the innovation loss (aux) mean_t r_t is differentiable in pred_proj.weight
    (and in the fading block that makes s), so a training loop can fit the predictor."""

    spec = S.bmojo(4, 2, window=1, chunk=2, select=1, capacity=2, d_state=2)
    p = params64(spec, 0)
    x = torch.from_numpy(inputs(spec, 1, 4, 0))
    names = ["pred_proj.weight", "fading.in_proj.weight"]

    def aux(w, w_in):
        params = dict(p, **{names[0]: w, names[1]: w_in})
        if not streaming:
            return L.forward_aux(spec, params, x)[2]
        state, total = None, 0.0
        for t in range(x.shape[1]):
            _, state, a = L.step_aux(spec, params, x[:, t], state)
            total = total + a
        return total / x.shape[1]

    args = tuple(torch.from_numpy(p[n].copy()).requires_grad_() for n in names)
    torch.autograd.gradcheck(aux, args, eps=1e-6, atol=1e-6, rtol=1e-4)
    g = torch.autograd.grad(aux(*args), args[0])[0]
    assert float(g.abs().max()) > 0
