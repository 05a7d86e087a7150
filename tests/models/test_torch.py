"""Torch model modules vs the reference model: logits, both forms, splits, aux loss, state
interchange, greedy generation (deterministic, equal to argmax decoding by the reference),
seeded sampling, and ``torch.compile`` against eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memcore.spec.reference import model as RM
from torchcheck import F64, assert_states_close, model_steps, rel

import memcore
from memcore import spec as S

MODEL_CASES = {
    "jamba": S.jamba(6, 2, pattern="MA", vocab_size=13, d_state=3),
    "jamba_window_layernorm": S.jamba(6, 3, pattern="AM", vocab_size=11, window=3, norm="layer",
                                      d_state=2),
    "bmojo_persistent": S.model([S.bmojo(6, 2, window=2, chunk=3, select=1, capacity=2,
                                         d_state=2), S.mosaic(6, 2, capacity=3)], 9,
                                ffn="persistent"),
    "mosaic_no_ffn": S.model([S.mosaic(6, 3), S.bmojo_f(6, 3, window=2, d_state=2)], 10,
                             ffn=None, logit_scale=0.5),
    "transformer_mlp": S.model([S.transformer(5, 1, window=None, positions="none")], 7,
                               mlp_ratio=2),
}


@pytest.fixture(params=list(MODEL_CASES))
def case(request):
    spec = MODEL_CASES[request.param]
    params = memcore.init(spec, 0, dtype=np.float64)
    return spec, params, memcore.realize(spec, backend="torch", params=params)


def _tokens(spec, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (B, T), generator=g)


def test_names_match_init(case):
    spec, params, model = case
    assert model.state_dict().keys() == params.keys()


def test_logits_match_reference_in_both_forms(case):
    spec, params, model = case
    tok = _tokens(spec, 2, 11)
    logits, state, aux = model.forward_aux(tok)
    ref, s_ref, aux_ref = RM.forward_aux(spec, params, tok)
    assert logits.shape == (2, 11, spec.vocab_size)
    assert rel(logits, ref) <= F64
    assert_states_close(state, s_ref)
    assert (aux is None) == (aux_ref is None)
    if aux_ref is not None:
        assert rel(aux, aux_ref) <= F64
    y_s, s = model_steps(model, tok)
    assert rel(y_s, ref) <= F64
    assert_states_close(s, s_ref)
    for a in (1, 4, 10):
        l1, s1 = model(tok[:, :a])
        l2, s2 = model(tok[:, a:], s1)
        assert rel(torch.cat([l1, l2], 1), ref) <= F64
        assert_states_close(s2, s_ref)


def test_logits_to_keep_gives_the_last_positions_and_the_same_state(case):
    spec, params, model = case
    tok = _tokens(spec, 2, 7, seed=3)
    full, state = model(tok)
    for keep in (1, 3, 7, 20):
        part, s = model(tok, logits_to_keep=keep)
        assert part.shape == (2, min(keep, 7), spec.vocab_size)
        assert rel(part, full[:, -keep:]) <= F64  # a shorter matmul may round differently
        assert_states_close(s, state)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"logits_to_keep must be an int >= 0"):
            model(tok, logits_to_keep=bad)


def test_state_interchange_with_reference(case):
    spec, params, model = case
    tok = _tokens(spec, 2, 9, seed=1)
    ref, s_ref, _ = RM.forward_aux(spec, params, tok)
    _, s = model(tok[:, :4])
    l_r, s_r, _ = RM.forward_aux(spec, params, tok[:, 4:], s)
    assert rel(l_r, ref[:, 4:]) <= F64
    _, s_from_ref, _ = RM.forward_aux(spec, params, tok[:, :6])
    l_b, s_b = model(tok[:, 6:], s_from_ref)
    assert rel(l_b, ref[:, 6:]) <= F64
    assert_states_close(s_b, s_ref)


def test_greedy_generation_is_argmax_decoding_of_the_reference(case):
    spec, params, model = case
    prompt = _tokens(spec, 2, 3, seed=2)
    new, state = model.generate(prompt, 6)
    assert new.shape == (2, 6)
    assert torch.equal(model.generate(prompt, 6)[0], new)  # deterministic
    seq = prompt
    for _ in range(6):  # the reference, re-run on the whole sequence each time
        logits, _ = RM.forward(spec, params, seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 3:])
    # the state has seen the prompt and every new token but the last
    _, s_ref = RM.forward(spec, params, seq[:, :-1])
    assert_states_close(state, s_ref)


def test_sampling_is_reproducible_with_a_generator(case):
    spec, params, model = case
    prompt = _tokens(spec, 3, 2, seed=3)
    a, _ = model.generate(prompt, 5, temperature=0.8,
                          generator=torch.Generator().manual_seed(5))
    b, _ = model.generate(prompt, 5, temperature=0.8,
                          generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 5)
    assert int(a.min()) >= 0 and int(a.max()) < spec.vocab_size
    none, _ = model.generate(prompt, 0)
    assert none.shape == (3, 0) and none.dtype == prompt.dtype


# Dynamo warns when it traces through array_api_compat's cached helpers (input checks).
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_matches_eager():
    spec = MODEL_CASES["jamba_window_layernorm"]
    params = memcore.init(spec, 0, dtype=np.float64)
    model = memcore.realize(spec, backend="torch", params=params)
    tok = _tokens(spec, 2, 7, seed=4)
    eager, s_eager = model(tok)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out, s_out = compiled(tok)
    assert rel(out, eager) <= F64
    assert_states_close(s_out, s_eager)
    out.sum().backward()  # the compiled graph also differentiates
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_model_errors():
    spec = MODEL_CASES["jamba"]
    model = memcore.realize(spec, backend="torch")
    tok = _tokens(spec, 2, 4)
    with pytest.raises(TypeError, match="integer token ids"):
        model(tok.float())
    with pytest.raises(ValueError, match=r"tokens must be \[batch, T\]"):
        model(tok[0])
    with pytest.raises(ValueError, match="vocab_size=13"):
        model(tok + 13)
    with pytest.raises(ValueError, match="another spec"):
        other = memcore.realize(MODEL_CASES["transformer_mlp"], backend="torch")
        model(tok, other.init_state(2))
    _, state = model(tok)
    bad = dict(state, layers=state["layers"][:1])
    with pytest.raises(ValueError, match="must hold 2 layer states"):
        model(tok, bad)
    with pytest.raises(ValueError, match=r"state\['layers'\]\[0\]"):
        model(tok[:1], state)  # batch 1 against a batch-2 state
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tok, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tok, 2, temperature=-1.0)
