"""Gradients of the reference on torch float64 tensors against central finite differences
(``torch.autograd.gradcheck``), for a few parameters of each realization, the initial state
(every float array of a state reached by a prefix) and the input x, in both forms."""

from __future__ import annotations

import numpy as np
import pytest
from refcheck import forward, inputs, is_model, params64, step

from memcore import spec as S

torch = pytest.importorskip("torch", reason="torch is needed for autograd")

CASES = [
    ("transformer_full", S.transformer(4, 2), ["q_proj.weight", "k_proj.weight"]),
    ("transformer_windowed", S.transformer(6, 2, window=2), ["k_proj.weight", "o_proj.weight"]),
    ("mamba", S.mamba(3, d_state=2, d_conv=3, expand=1),
     ["A_log", "dt_proj.bias", "conv1d.weight", "D"]),
    ("bmojo_f", S.bmojo_f(4, 2, window=2, d_state=2, tie_fading=False),
     ["k_fading_proj.weight", "fading.A_log", "q_proj.weight"]),
    ("bmojo", S.bmojo(4, 2, window=1, chunk=2, select=1, capacity=2, d_state=2),
     ["k_proj.weight", "v_proj.weight", "fading.x_proj.weight"]),
    ("mosaic", S.mosaic(4, 2), ["leak", "k_scale", "v_scale", "v_mix"]),
    ("mosaic_capacity", S.mosaic(6, 2, capacity=2), ["k_proj.weight", "v_mix"]),
    ("persistent", S.persistent(4, 2, slots=3), ["mem_k", "out_scale", "leak", "k_scale"]),
    ("model", S.model([S.transformer(4, 2, window=2), S.mosaic(4, 2)], 5, ffn="persistent"),
     ["embed.weight", "layers.0.norm1.weight", "layers.1.ffn.mem_v"]),
    ("jamba", S.jamba(4, 2, pattern="MA", vocab_size=5, d_state=2),
     ["embed.weight", "layers.0.mixer.A_log", "layers.1.ffn.fc1.weight"]),
]
PREFIX, T = 3, 3


def _flatten(state, path=()):
    """(path, array) for every float array of a (possibly nested) state."""
    out = []
    if isinstance(state, dict):
        for k in sorted(state):
            out += _flatten(state[k], path + (k,))
    elif isinstance(state, tuple):
        for i, v in enumerate(state):
            out += _flatten(v, path + (i,))
    elif not isinstance(state, (int, str)) and np.issubdtype(np.asarray(
            state.detach() if hasattr(state, "detach") else state).dtype, np.floating):
        out.append((path, state))
    return out


def _replace(state, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(state, dict):
        return {**state, head: _replace(state[head], rest, value)}
    return tuple(_replace(v, rest, value) if i == head else v for i, v in enumerate(state))


def _torch_state(state):
    """Every array of a numpy state as a torch tensor (ints stay ints)."""
    if isinstance(state, dict):
        return {k: _torch_state(v) for k, v in state.items()}
    if isinstance(state, tuple):
        return tuple(_torch_state(v) for v in state)
    if isinstance(state, np.ndarray):
        return torch.from_numpy(state.copy())
    return state


def _setup(spec, names, seed=0):
    p = params64(spec, seed)
    missing = set(names) - set(p)
    assert not missing, f"test names unknown parameters {missing}"
    x = inputs(spec, 1, PREFIX + T, seed)
    _, s0 = forward(spec, p, x[:, :PREFIX])  # a non-empty initial state
    s0 = _torch_state(s0)
    leaves = _flatten(s0)
    xt = torch.from_numpy(x[:, PREFIX:].copy())
    tensors = [torch.from_numpy(p[n].copy()).requires_grad_() for n in names]
    tensors += [a.clone().requires_grad_() for _, a in leaves]
    if not is_model(spec):
        tensors.append(xt.clone().requires_grad_())
    return p, s0, leaves, xt, tensors


def _outputs(y, state):
    return (y,) + tuple(a for _, a in _flatten(state))


@pytest.mark.parametrize("spec,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["parallel", "streaming"])
def test_gradients_match_finite_differences(spec, names, form):
    p, s0, leaves, xt, tensors = _setup(spec, names)
    n_p, n_s = len(names), len(leaves)

    def fn(*args):
        params = dict(p, **{n: a for n, a in zip(names, args[:n_p], strict=True)})
        state = s0
        for (path, _), a in zip(leaves, args[n_p:n_p + n_s], strict=True):
            state = _replace(state, path, a)
        x = xt if is_model(spec) else args[-1]
        if form == "parallel":
            y, new = forward(spec, params, x, state)
            return _outputs(y, new)
        ys = []
        for t in range(2):  # two steps: the second reads what the first wrote
            y, state = step(spec, params, x[:, t], state)
            ys.append(y)
        return _outputs(torch.stack(ys, dim=1), state)

    outs = fn(*tensors)
    assert all(o.dtype == torch.float64 for o in outs)
    assert outs[0].requires_grad, "y is cut off from the graph"
    torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-6, rtol=1e-4)




