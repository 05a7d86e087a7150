"""Torch layers vs the reference (run on torch tensors) on the same parameters: parallel form,
streaming form, split calls (every split, inside chunks too), awkward lengths (T = 1, T < W,
T not a multiple of the chunk), outputs, final states and the bmojo aux loss; float64 within
1e-9 and float32 within a relative RMSE of 1e-5; states pass between the two both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchcheck import (
    F32,
    F64,
    LAYER_CASES,
    assert_states_close,
    inputs,
    ref_forward,
    ref_steps,
    rel,
    rmse,
    steps,
)

import memcore

IDS = list(LAYER_CASES)


@pytest.fixture(params=IDS)
def case(request):
    spec = LAYER_CASES[request.param]
    params = memcore.init(spec, 0, dtype=np.float64)
    return spec, params, memcore.realize(spec, backend="torch", params=params)


@pytest.mark.parametrize("T", [1, 2, 7, 13])
def test_parallel_matches_reference(case, T):
    spec, params, layer = case
    x = inputs(spec, 2, T, seed=T)
    y, state, aux = layer.forward_aux(x)
    y_ref, s_ref, aux_ref = ref_forward(spec, params, x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert rel(y, y_ref) <= F64
    assert_states_close(state, s_ref)
    if aux_ref is None:
        assert aux is None
    else:
        assert rel(aux, aux_ref) <= F64


@pytest.mark.parametrize("T", [1, 9])
def test_streaming_matches_reference(case, T):
    spec, params, layer = case
    x = inputs(spec, 2, T, seed=10 + T)
    y, state, aux = steps(layer, x)
    y_ref, s_ref, aux_ref = ref_steps(spec, params, x)
    assert rel(y, y_ref) <= F64
    assert_states_close(state, s_ref)
    for a, b in zip(aux, aux_ref, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            assert rel(a, b) <= F64


def test_every_split_matches_one_call(case):
    spec, params, layer = case
    T = 11
    x = inputs(spec, 2, T, seed=3)
    y_ref, s_ref, _ = ref_forward(spec, params, x)
    for a in range(1, T):
        y1, s1 = layer(x[:, :a])
        y2, s2 = layer(x[:, a:], s1)
        assert rel(torch.cat([y1, y2], 1), y_ref) <= F64, f"split at {a}"
        assert_states_close(s2, s_ref)


def test_parallel_after_steps_and_steps_after_parallel(case):
    spec, params, layer = case
    x = inputs(spec, 1, 10, seed=4)
    y_ref, s_ref, _ = ref_forward(spec, params, x)
    y1, s = steps(layer, x[:, :3])[:2]
    y2, s = layer(x[:, 3:7], s)
    y3, s = steps(layer, x[:, 7:], s)[:2]
    assert rel(torch.cat([y1, y2, y3], 1), y_ref) <= F64
    assert_states_close(s, s_ref)


def test_float32_matches_float64_reference(case):
    spec, params, _ = case
    p32 = memcore.init(spec, 0)  # float32 parameters
    layer = memcore.realize(spec, backend="torch", params=p32)
    x = inputs(spec, 2, 13, seed=5)
    y, state = layer(x.float())
    y_ref, s_ref, _ = ref_forward(spec, {k: v.astype(np.float64) for k, v in p32.items()},
                                  x.float().double())
    assert y.dtype == torch.float32
    assert rmse(y, y_ref) <= F32
    y_s, s_s, _ = steps(layer, x.float())
    assert rmse(y_s, y_ref) <= F32
    # The state is float32 (the accumulation dtype); its store positions are exact.
    for key, arr in state.items():
        if isinstance(arr, torch.Tensor) and arr.is_floating_point():
            assert arr.dtype == torch.float32
            if arr.numel():
                assert rmse(arr, s_ref[key]) <= F32, key
        elif isinstance(arr, torch.Tensor):
            assert torch.equal(arr, s_ref[key])


def test_state_passes_to_reference_and_back(case):
    spec, params, layer = case
    x = inputs(spec, 2, 12, seed=6)
    y_ref, s_ref, _ = ref_forward(spec, params, x)
    # torch state -> reference
    _, s_torch = layer(x[:, :5])
    y2, s2, _ = ref_forward(spec, params, x[:, 5:], s_torch)
    assert rel(y2, y_ref[:, 5:]) <= F64
    assert_states_close(s2, s_ref)
    # reference state -> torch (both forms)
    _, s_r, _ = ref_forward(spec, params, x[:, :8])
    y3, s3 = layer(x[:, 8:], s_r)
    assert rel(y3, y_ref[:, 8:]) <= F64
    assert_states_close(s3, s_ref)
    y4, s4, _ = steps(layer, x[:, 8:], s_r)
    assert rel(y4, y_ref[:, 8:]) <= F64
    assert_states_close(s4, s_ref)


def test_init_state_has_the_reference_format(case):
    spec, params, layer = case
    like = torch.zeros(1, dtype=torch.float64)
    assert_states_close(layer.init_state(3), memcore.spec.reference.layers.init_state(
        spec, 3, like))
    s32 = layer.init_state(2, dtype=torch.float16)  # half inputs accumulate in float32
    for key, arr in s32.items():
        if isinstance(arr, torch.Tensor) and arr.is_floating_point():
            assert arr.dtype == torch.float32, key


def test_state_size_does_not_grow(case):
    spec, params, layer = case
    grows = (getattr(spec, "window", 0) is None and spec.kind == "transformer") or (
        spec.kind == "mosaic" and spec.capacity is None)
    x = inputs(spec, 1, 12, seed=7)
    state = layer.init_state(1)
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    for t in range(12):
        _, state = layer.step(x[:, t], state)
        now = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not grows:
            assert now == shapes, f"state changed shape at t={t}"
    if grows:  # a KV cache holds one entry per token (or completed pair)
        assert any(now[k] != shapes[k] for k in now)


def test_parameter_names_are_inits_names(case):
    spec, params, layer = case
    assert layer.state_dict().keys() == params.keys()
    for name, p in layer.named_parameters():
        assert isinstance(p, torch.nn.Parameter)
        assert np.array_equal(p.detach().numpy(), params[name])


def test_dtype_moves(case):
    spec, params, layer = case
    x = inputs(spec, 1, 5, seed=8)
    y64 = layer(x)[0]
    layer32 = memcore.realize(spec, backend="torch", params=params).float()
    assert rmse(layer32(x.float())[0], y64) <= F32
    half = memcore.realize(spec, backend="torch", params=params).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    y16, s16 = half(x.half())
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    assert rmse(y16, y64) <= 1e-2  # half parameters and inputs, float32 accumulation
    y16s, _ = half.step(x[:, 0].half(), s16)
    assert y16s.dtype == torch.float16
    back = half.double()
    assert all(p.dtype == torch.float64 for p in back.parameters())


def test_aux_loss_has_gradient():
    spec = LAYER_CASES["bmojo"]
    layer = memcore.realize(spec, backend="torch")
    _, _, aux = layer.forward_aux(inputs(spec, 2, 9, dtype=torch.float32))
    aux.backward()
    g = layer.pred_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_ties_in_the_innovation_score_follow_the_total_order():
    # Without fading the score is mean(x_t^2): repeated tokens tie, and the later one wins.
    spec = memcore.spec.bmojo(4, 1, window=1, chunk=4, select=2, capacity=3, fading=False)
    params = memcore.init(spec, 0, dtype=np.float64)
    layer = memcore.realize(spec, backend="torch", params=params)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    x = base[:, torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 1, 2, 0, 0, 1])]
    y, state = layer(x)
    y_ref, s_ref, _ = ref_forward(spec, params, x)
    assert rel(y, y_ref) <= F64
    assert_states_close(state, s_ref)
    assert torch.equal(state["store_pos"], s_ref["store_pos"])
    y_s, s_s, _ = steps(layer, x)
    assert rel(y_s, y_ref) <= F64
    assert torch.equal(s_s["store_pos"], s_ref["store_pos"])


def test_inplace_steps_write_into_preallocated_rings(case):
    spec, params, layer = case
    x = inputs(spec, 2, 9, seed=9)
    y_ref, s_ref, _ = steps(layer, x)
    rings = ("k", "v", "fk", "fv") if spec.kind != "mosaic" else ("mem_k", "mem_v")
    fixed = not ((spec.kind == "transformer" and spec.window is None)
                 or (spec.kind == "mosaic" and spec.capacity is None))
    with torch.no_grad():
        state = layer.init_state(2)
        ys, ptrs = [], [{k: state[k].data_ptr() for k in rings if k in state}]
        for t in range(x.shape[1]):
            y, state = layer.step(x[:, t], state, inplace=True)
            ys.append(y)
            ptrs.append({k: state[k].data_ptr() for k in rings if k in state})
    assert rel(torch.stack(ys, 1), y_ref) <= F64
    assert_states_close(state, s_ref)
    if fixed:  # init_state's own buffers are written from the first step on
        assert all(p == ptrs[0] for p in ptrs[1:])
    with pytest.raises(ValueError, match="torch.no_grad"):
        layer.step(x[:, 0], None, inplace=True)


def test_reductions_hold_on_the_torch_backend():
    """DESIGN 3: bmojo with capacity 0 is bmojo_f; bmojo_f without fading is a sliding-window
    transformer; on the same parameters (names shared by init)."""
    x = inputs(LAYER_CASES["bmojo"], 2, 11, seed=12)
    pairs = [
        (memcore.spec.bmojo(6, 2, window=3, chunk=4, select=2, capacity=0, d_state=2),
         memcore.spec.bmojo_f(6, 2, window=3, d_state=2)),
        (memcore.spec.bmojo_f(6, 2, window=3, fading=False),
         memcore.spec.transformer(6, 2, window=3)),
    ]
    for big, small in pairs:
        p_big = memcore.init(big, 0, dtype=np.float64)
        p_small = {k: v for k, v in p_big.items() if k in memcore.init(small, 0)}
        y_big = memcore.realize(big, backend="torch", params=p_big)(x)[0]
        y_small = memcore.realize(small, backend="torch", params=p_small)(x)[0]
        assert rel(y_big, y_small) <= F64


def test_bfloat16_runs_with_float32_accumulation():
    spec = LAYER_CASES["bmojo"]
    params = memcore.init(spec, 0, dtype=np.float64)
    layer = memcore.realize(spec, backend="torch", params=params).to(torch.bfloat16)
    x = inputs(spec, 2, 9, seed=13)
    y, state = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert state["k"].dtype == torch.float32
    y_ref = ref_forward(spec, {k: torch.from_numpy(v).bfloat16().double()
                               for k, v in params.items()}, x.bfloat16().double())[0]
    assert rmse(y.double(), y_ref) <= 1e-2  # DESIGN 6: bf16
