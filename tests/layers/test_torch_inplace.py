"""Streaming ``step`` of the torch backend, in place and functional.

In place (under ``torch.no_grad()``): many steps, across several chunk ends, a store that
fills up and tied innovation scores, equal the reference's streaming form and the parallel
form in float64, and every state tensor keeps its storage, shape and strides from the first
step to the last (only the caches that grow by design may move). Functional (the default):
the caller's state is left untouched, the new state shares no tensor with it, and gradients
through such steps match the reference's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memcore.spec.reference import layers as RL
from memcore.spec.reference import model as RM
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchcheck import F32, F64, assert_states_close, inputs, ref_steps, rel, rmse

import memcore
from memcore import spec as S

T = 26  # several chunk ends for every chunk below; windows and rings wrap many times

# name -> (spec, tied scores: innovation scores repeat exactly)
CASES = {
    "bmojo": (S.bmojo(6, 2, window=3, chunk=4, select=2, capacity=3, d_state=2), False),
    "bmojo_ties": (S.bmojo(6, 2, window=2, chunk=3, select=2, capacity=4, d_state=2), True),
    "bmojo_nofading_ties": (S.bmojo(5, 1, window=2, chunk=5, select=2, capacity=4,
                                    fading=False), True),
    "bmojo_f": (S.bmojo_f(6, 2, window=3, d_state=3), False),
    "transformer_window": (S.transformer(6, 3, window=4), False),
    "mamba": (S.mamba(6, d_state=3, d_conv=3), False),
    "mosaic_capacity": (S.mosaic(6, 3, capacity=3), False),
    "persistent": (S.persistent(6, 2, slots=5), False),
    # caches that grow by design: every other array stays put
    "transformer_full": (S.transformer(6, 2), False),
    "mosaic": (S.mosaic(6, 2), False),
}
GROWING = {"transformer_full": ("k", "v"), "mosaic": ("mem_k", "mem_v")}


def _setup(name):
    spec, ties = CASES[name]
    params = memcore.init(spec, 0, dtype=np.float64)
    if ties:
        if "pred_proj.weight" in params:  # innovation = mean(x^2): equal for equal tokens
            params["pred_proj.weight"] = np.zeros_like(params["pred_proj.weight"])
        g = torch.Generator().manual_seed(5)
        base = torch.randn(2, 3, spec.d_model, generator=g, dtype=torch.float64)
        x = base[:, torch.randint(0, 3, (T,), generator=g)]
    else:
        x = inputs(spec, 2, T, seed=7)
    layer = memcore.realize(spec, backend="torch", params=params)
    return spec, params, layer, x


def _arrays(state, prefix=""):
    """Every tensor of a layer or model state by a path name."""
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out.update(_arrays(v, f"{prefix}{k}."))
        return out
    if isinstance(state, (tuple, list)):
        out = {}
        for i, v in enumerate(state):
            out.update(_arrays(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: state} if isinstance(state, torch.Tensor) else {}


def _layout(state, skip=()):
    return {k: (a.data_ptr(), a.untyped_storage().data_ptr(), tuple(a.shape), a.stride())
            for k, a in _arrays(state).items() if k.split(".")[-1] not in skip}


def _storages(state):
    return {a.untyped_storage().data_ptr() for a in _arrays(state).values() if a.numel()}


@pytest.mark.parametrize("name", list(CASES))
def test_inplace_steps_match_reference_and_parallel_without_moving_the_state(name):
    spec, params, layer, x = _setup(name)
    with torch.no_grad():
        state = layer.init_state(2)
        start = _layout(state, GROWING.get(name, ()))
        ys, aux = [], []
        for t in range(T):
            y, out, a = layer.step_aux(x[:, t], state, inplace=True)
            assert out is state, "an in-place step returns the state it was given"
            assert state["pos"] == t + 1
            assert _layout(state, GROWING.get(name, ())) == start, f"a state tensor moved at {t}"
            ys.append(y)
            aux.append(a)
        y_par, s_par = layer(x)
    y_in = torch.stack(ys, 1)
    y_ref, s_ref, aux_ref = ref_steps(spec, params, x)
    assert rel(y_in, y_ref) <= F64
    assert rel(y_in, y_par) <= F64
    assert_states_close(state, s_ref)
    assert_states_close(state, s_par)
    if aux_ref[0] is not None:
        assert rel(torch.stack(aux), torch.stack(aux_ref)) <= F64
    if getattr(spec, "store", None) is not None:
        # the selection is exact, not only close; the store did fill up
        assert torch.equal(state["store_pos"], s_ref["store_pos"])
        assert torch.equal(state["cand_pos"], s_ref["cand_pos"])
        assert bool((state["store_pos"] >= 0).all())
    if CASES[name][1]:  # ties happened among the scores the selection ranked
        sc = torch.stack(aux_ref)
        assert sc.unique().numel() < sc.numel()


@pytest.mark.parametrize("name", ["bmojo", "bmojo_nofading_ties", "mamba", "mosaic_capacity",
                                  "persistent", "mosaic"])
def test_inplace_steps_continue_a_parallel_prefix(name):
    spec, params, layer, x = _setup(name)
    with torch.no_grad():
        y_par, s_par = layer(x)
        _, state = layer(x[:, :9])
        ys = [layer.step(x[:, t], state, inplace=True)[0] for t in range(9, T)]
    assert rel(torch.stack(ys, 1), y_par[:, 9:]) <= F64
    assert_states_close(state, s_par)


@pytest.mark.parametrize("name", list(CASES))
def test_functional_step_leaves_the_callers_state_alone(name):
    spec, params, layer, x = _setup(name)
    with torch.no_grad():
        state = layer.init_state(2)
        for t in range(13):  # a mid-stream state: store partly filled, rings wrapped
            layer.step(x[:, t], state, inplace=True)
    before = {k: a.clone() for k, a in _arrays(state).items()}
    layout = _layout(state)
    y, new = layer.step(x[:, 13], state)
    assert new is not state and state["pos"] == 13 and new["pos"] == 14
    assert _layout(state) == layout
    for k, a in _arrays(state).items():
        assert torch.equal(a, before[k]), f"state[{k}] changed"
    # nothing shared: stepping either one in place later cannot reach the other
    assert not (_storages(new) & _storages(state))
    with torch.no_grad():
        y_in, _ = layer.step(x[:, 13], state, inplace=True)
    assert rel(y, y_in) <= F64
    assert_states_close(state, new)


def test_functional_steps_after_inplace_steps_have_the_reference_gradients():
    spec, params, layer, x = _setup("bmojo")
    with torch.no_grad():
        state = layer.init_state(2)
        for t in range(10):
            layer.step(x[:, t], state, inplace=True)
    ref_state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    xb = x[:, 10:16].clone().requires_grad_(True)
    total, s = 0.0, state
    for t in range(xb.shape[1]):
        y, s, aux = layer.step_aux(xb[:, t], s)
        total = total + (y * (t + 1)).sum() + 2.0 * aux
    layer.zero_grad()
    total.backward()
    rp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xr = x[:, 10:16].clone().requires_grad_(True)
    total_r, s = 0.0, ref_state
    for t in range(xr.shape[1]):
        y, s, a = RL.step_aux(spec, rp, xr[:, t], s)
        total_r = total_r + (y * (t + 1)).sum() + 2.0 * a
    total_r.backward()
    assert rel(xb.grad, xr.grad) <= F64
    for n, p in layer.named_parameters():
        assert rel(p.grad, rp[n].grad) <= F64, n


def test_inplace_step_refuses_autograd():
    spec, params, layer, x = _setup("bmojo")
    state = layer.init_state(2)
    with pytest.raises(ValueError, match="torch.no_grad"):
        layer.step(x[:, 0], state, inplace=True)
    assert state["pos"] == 0


MODEL = S.model([S.bmojo(6, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
                 S.mosaic(6, 2, capacity=3), S.bmojo_f(6, 2, window=2, d_state=2)], 9,
                ffn="persistent")


def _model():
    params = memcore.init(MODEL, 0, dtype=np.float64)
    return params, memcore.realize(MODEL, backend="torch", params=params)


def test_model_inplace_steps_match_reference_without_moving_the_state():
    params, model = _model()
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, MODEL.vocab_size, (2, T), generator=g)
    with torch.no_grad():
        state = model.init_state(2)
        layers = state["layers"]
        start = _layout(state)
        outs = []
        for t in range(T):
            out, ret = model.step(tok[:, t], state, inplace=True)
            assert ret is state and state["layers"] is layers and state["pos"] == t + 1
            assert _layout(state) == start, f"a state tensor moved at {t}"
            outs.append(out)
        logits, s_par = model(tok)
    ref, s_ref = RM.forward(MODEL, params, tok)
    assert rel(torch.stack(outs, 1), ref) <= F64
    assert rel(torch.stack(outs, 1), logits) <= F64
    assert_states_close(state["layers"][0], s_ref["layers"][0])
    for a, b, c in zip(state["layers"] + state["ffn"], s_ref["layers"] + s_ref["ffn"],
                       s_par["layers"] + s_par["ffn"], strict=True):
        assert_states_close(a, b)
        assert_states_close(a, c)


def test_generate_steps_in_place_on_a_private_state(monkeypatch):
    params, model = _model()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, MODEL.vocab_size, (2, 5), generator=g)
    with torch.no_grad():
        _, state = model(prompt[:, :2])
    before = {k: a.clone() for k, a in _arrays(state).items()}
    layout = _layout(state)
    calls = []
    step = model.step

    def spy(tokens_t, st=None, *, inplace=False):
        calls.append(inplace)
        return step(tokens_t, st, inplace=inplace)

    monkeypatch.setattr(model, "step", spy)
    new, _ = model.generate(prompt[:, 2:], 8, state=state)
    assert calls == [True] * 7
    assert _layout(state) == layout
    for k, a in _arrays(state).items():
        assert torch.equal(a, before[k]), f"the caller's state[{k}] changed"
    # greedy decoding by the reference, token by token from the same state
    s, seq = RM.forward(MODEL, params, prompt)[1], prompt
    last = RM.forward(MODEL, params, prompt)[0][:, -1]
    for _ in range(8):
        nxt = last.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        last, s = RM.step(MODEL, params, nxt, s)
    assert torch.equal(new, seq[:, prompt.shape[1]:])


def test_steps_follow_parameter_updates_and_replacements():
    """Per-token calls keep the parameters between tokens: an in-place update (training),
    a replaced parameter (load_state_dict(assign=True)) and a dtype change must all be seen."""
    spec, params, layer, x = _setup("bmojo")
    state = layer.init_state(2)
    layer.step(x[:, 0], state)
    with torch.no_grad():
        layer.q_proj.weight.mul_(0.5)
    p1 = {k: v.copy() for k, v in params.items()}
    p1["q_proj.weight"] = p1["q_proj.weight"] * 0.5
    y, _ = layer.step(x[:, 0], state)
    assert rel(y, RL.step(spec, p1, x[:, 0], state)[0]) <= F64
    p2 = memcore.init(spec, 1, dtype=np.float64)
    layer.load_state_dict({k: torch.tensor(v) for k, v in p2.items()}, assign=True)
    y, _ = layer.step(x[:, 0], state)
    assert rel(y, RL.step(spec, p2, x[:, 0], state)[0]) <= F64
    layer.float()
    y32, _ = layer.step(x[:, 0].float(), layer.init_state(2))
    ref32 = RL.step(spec, {k: v.astype(np.float32) for k, v in p2.items()}, x[:, 0].float())[0]
    assert rmse(y32, ref32) <= F32


@pytest.mark.parametrize("name", list(GROWING))
def test_growing_caches_append_in_place_amortised(name):
    spec, params, layer, _ = _setup(name)
    n = 150
    x = inputs(spec, 2, n, seed=8)
    grown = GROWING[name]
    with torch.no_grad():
        y_par, s_par = layer(x)
        state = layer.init_state(2)
        storages, ys = set(), []
        for t in range(n):
            ys.append(layer.step(x[:, t], state, inplace=True)[0])
            storages.add(tuple(state[k].untyped_storage().data_ptr() for k in grown))
    assert rel(torch.stack(ys, 1), y_par) <= F64
    assert_states_close(state, s_par)
    assert len(storages) <= 4, f"{len(storages)} buffers for {n} appends"


@pytest.mark.parametrize("name", list(GROWING))
def test_growing_cache_never_writes_past_a_callers_slice(name):
    spec, params, layer, x = _setup(name)
    with torch.no_grad():
        _, state = layer(x[:, :6])
        n = {k: state[k].shape[2] for k in GROWING[name]}
        mine = {k: torch.cat([state[k], torch.full_like(state[k], 7.0)], dim=2)
                for k in GROWING[name]}
        state.update({k: mine[k][:, :, :n[k]] for k in GROWING[name]})
        y, _ = layer.step(x[:, 6], state, inplace=True)
        y_ref, _ = layer(x[:, :7])
    assert rel(y, y_ref[:, 6]) <= F64
    for k in GROWING[name]:
        assert bool((mine[k][:, :, n[k]:] == 7.0).all()), f"{k}: written past the slice"


class _LargestAllocation(TorchDispatchMode):
    """Records the largest new storage any operator returns (outputs that alias an input,
    views and in-place results, allocate nothing)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, o.untyped_storage().nbytes())
        return out


def _largest_allocation(layer, x, state, inplace: bool) -> int:
    """The largest block one operator allocates over the steps of x [B, T, D]."""
    log = _LargestAllocation()
    with torch.no_grad(), log:
        for t in range(x.shape[1]):
            _, state = layer.step(x[:, t], state, inplace=inplace)
    return log.largest


@pytest.mark.parametrize("spec", [
    S.bmojo(32, 2, window=64, chunk=16, select=2, capacity=32, d_state=2),
    S.mosaic(32, 2, capacity=64),
], ids=["bmojo", "mosaic_capacity"])
def test_inplace_steps_allocate_nothing_the_size_of_a_ring(spec):
    """Temporaries stay smaller than one ring buffer: no ring, store or joined key/value
    buffer is rebuilt per token (the functional step, which copies rings, is the control)."""
    layer = memcore.realize(spec, backend="torch", params=memcore.init(spec, 0, np.float64))
    x = inputs(spec, 1, 170, seed=3)
    with torch.no_grad():
        state = layer.init_state(1)
        for t in range(150):  # rings wrapped, store full
            layer.step(x[:, t], state, inplace=True)
    ring = state["k" if "k" in state else "mem_k"]
    ring_bytes = ring.numel() * ring.element_size()
    copy = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    assert _largest_allocation(layer, x[:, 150:], copy, inplace=False) >= ring_bytes
    assert _largest_allocation(layer, x[:, 150:], state, inplace=True) < ring_bytes


def test_inplace_steps_leave_a_training_graph_intact():
    """A state from a differentiable call is copied off its graph by the first in-place step,
    so the graph's backward still works and gives the reference's gradients."""
    spec, params, layer, x = _setup("bmojo")
    xb = x[:, :9].clone().requires_grad_(True)
    y, state = layer(xb)
    with torch.no_grad():
        for t in range(9, 14):
            layer.step(x[:, t], state, inplace=True)
    (y * y).sum().backward()
    xr = x[:, :9].clone().requires_grad_(True)
    (RL.forward(spec, params, xr)[0] ** 2).sum().backward()
    assert rel(xb.grad, xr.grad) <= F64
    with torch.no_grad():
        y_full, _ = layer(x[:, :15])
        y_next, _ = layer.step(x[:, 14], state, inplace=True)
    assert rel(y_next, y_full[:, 14]) <= F64
