"""Shared pieces of the torch backend's tests: a table of small, awkward layer specs,
float64 parameters, runs of the reference on torch tensors, and comparisons."""

from __future__ import annotations

import numpy as np
import torch
from memcore.spec.reference import layers as RL

import memcore
from memcore import spec as S
from memcore.testing import TOLERANCE, relative_error, relative_rmse, state_arrays

F64 = TOLERANCE["float64"]  # DESIGN 6: backend vs reference in float64
F32 = TOLERANCE["float32"]  # relative RMSE in float32

# Odd head widths (E = 3, 1, 5), windows longer than short inputs, chunks that do not divide T,
# capacity 0, select 0 and select == chunk.
LAYER_CASES = {
    "transformer_full": S.transformer(6, 2),
    "transformer_window": S.transformer(6, 3, window=4),
    "transformer_window1_nope": S.transformer(5, 1, window=1, positions="none"),
    "mamba": S.mamba(6, d_state=3, d_conv=3),
    "mamba_conv1": S.mamba(4, d_state=2, d_conv=1, expand=1),
    "bmojo_f": S.bmojo_f(6, 2, window=3, d_state=3),
    "bmojo_f_untied": S.bmojo_f(6, 3, window=2, d_state=2, tie_fading=False, expand=1),
    "bmojo_f_nofading": S.bmojo_f(6, 2, window=3, fading=False),
    "bmojo": S.bmojo(6, 2, window=3, chunk=4, select=2, capacity=3, d_state=2),
    "bmojo_capacity0": S.bmojo(6, 2, window=2, chunk=3, select=2, capacity=0, d_state=2),
    "bmojo_select0": S.bmojo(6, 2, window=2, chunk=3, select=0, capacity=4, d_state=2),
    "bmojo_select_chunk": S.bmojo(6, 3, window=2, chunk=3, select=3, capacity=5, d_state=2,
                                  positions="none"),
    "bmojo_nofading": S.bmojo(5, 1, window=2, chunk=5, select=2, capacity=4, fading=False),
    "mosaic": S.mosaic(6, 2),
    "mosaic_capacity": S.mosaic(6, 3, capacity=3),
    "mosaic_capacity1": S.mosaic(6, 2, capacity=1),
    "persistent": S.persistent(6, 2, slots=5),
}


def params64(spec, seed: int = 0) -> dict:
    return memcore.init(spec, seed, dtype=np.float64)


def realize64(spec, seed: int = 0):
    params = params64(spec, seed)
    return memcore.realize(spec, backend="torch", params=params), params


def inputs(spec, batch: int, T: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T, spec.d_model, generator=g, dtype=torch.float64).to(dtype)


def rel(a, b) -> float:
    return relative_error(a, b)


def rmse(a, b) -> float:
    return relative_rmse(a, b)


def assert_states_close(actual, expected, tol: float = F64, measure=relative_error):
    """Same keys, shapes and (for arrays) values; ``pos`` and ``spec_id`` equal exactly."""
    if isinstance(expected, dict):
        assert actual["spec_id"] == expected["spec_id"]
        assert actual["pos"] == expected["pos"] and type(actual["pos"]) is int
    a, b = state_arrays(actual), state_arrays(expected)
    assert set(a) == set(b), (sorted(a), sorted(b))
    for key in b:
        assert a[key].shape == b[key].shape, (key, a[key].shape, b[key].shape)
        assert a[key].dtype == b[key].dtype, (key, a[key].dtype, b[key].dtype)
        err = measure(a[key], b[key])
        assert err <= tol, f"state[{key}]: error {err:.3e} > {tol:.0e}"


def ref_forward(spec, params, x, state=None):
    """The reference on torch tensors: (y, state, aux)."""
    return RL.forward_aux(spec, params, x, state)


def ref_steps(spec, params, x, state=None):
    ys, aux = [], []
    for t in range(x.shape[1]):
        y, state, a = RL.step_aux(spec, params, x[:, t], state)
        ys.append(y)
        aux.append(a)
    return torch.stack(ys, 1), state, aux


def steps(layer, x, state=None):
    ys, aux = [], []
    for t in range(x.shape[1]):
        y, state, a = layer.step_aux(x[:, t], state)
        ys.append(y)
        aux.append(a)
    return torch.stack(ys, 1), state, aux


def detach_state(state):
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, tuple):
        return tuple(detach_state(v) for v in state)
    return state.detach() if isinstance(state, torch.Tensor) else state


def randn(g, *shape, dtype=torch.float64):
    """Standard normal draws made in float64 (the same numbers for every dtype), then cast."""
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def scan_args(g, Bt, Dc, N, T, groups, dtype=torch.float64):
    """Selective scan inputs (u, delta, A, B, C, D, z, delta_bias, initial_state); ``groups``
    0 gives B and C without a group axis."""
    u, delta, z = (randn(g, Bt, Dc, T, dtype=dtype) for _ in range(3))
    A = -torch.rand(Dc, N, generator=g, dtype=torch.float64).to(dtype) * 2
    shape = (Bt, groups, N, T) if groups else (Bt, N, T)
    B, C = randn(g, *shape, dtype=dtype), randn(g, *shape, dtype=dtype)
    D, bias = randn(g, Dc, dtype=dtype), randn(g, Dc, dtype=dtype)
    h0 = randn(g, Bt, Dc, N, dtype=dtype)
    return u, delta, A, B, C, D, z, bias, h0


def model_steps(model, tok, state=None):
    """The model's step form over tok's time axis: (logits stacked on axis 1, final state)."""
    outs = []
    for t in range(tok.shape[1]):
        out, state = model.step(tok[:, t], state)
        outs.append(out)
    return torch.stack(outs, 1), state
