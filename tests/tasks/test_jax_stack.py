"""The tasks' JAX models (the JAX model realization, and the moons memory's twin): the same
parameter names and initial values as the torch models, and, on the torch model's weights, the
same outputs (float32 relative RMSE <= 1e-5)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("jax")
pytest.importorskip("equinox")

import jax.numpy as jnp  # noqa: E402

from memcore.tasks import moons, moons_model, mqar, mqar_configs  # noqa: E402
from memcore.tasks.jax_stack import (  # noqa: E402
    JaxMoonsMemory,
    check_inputs,
    load_state_dict,
    logits_aux,
    n_params,
    pad_positions,
    state_dict,
)
from memcore.tasks.stack import state_bytes, task_model  # noqa: E402

TOL = 1e-5  # DESIGN section 6: float32 relative RMSE
CFG = replace(mqar_configs.QUICK, vocab_size=64, seq_len=16, num_kv_pairs=2, d_model=16,
              window=4, chunk=4, select=2, capacity=8)


def rel_rmse(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got))
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))


def _tokens(n=3, seed=0):
    return mqar.generate(n, CFG.vocab_size, CFG.seq_len, CFG.num_kv_pairs,
                         np.random.default_rng(seed))


# One of each mixer family (the store, fading window and aux loss with bmojo); the
# transformers train side by side with torch in test_jax_train.py.
@pytest.mark.parametrize("name", ["bmojo", "mamba", "mosaic"])
def test_task_lm_matches_torch(name):
    spec = mqar_configs.model_spec(name, CFG)
    assert spec.short_conv == 3
    ref = task_model("torch", spec, 3)
    # the same seed gives the same initial values, under the same names
    init = state_dict(task_model("jax", spec, 3))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert set(init) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(init[k], sd[k], err_msg=k)
    # another seed's model, given the torch weights, computes the torch logits
    ours = load_state_dict(task_model("jax", spec, 8), ref.state_dict())
    x, _ = _tokens(1)  # batch 1: state_bytes below reuses the compiled layers
    with torch.no_grad():
        want = ref(torch.as_tensor(x)).numpy()
    logits, aux = logits_aux(ours, jnp.asarray(x))
    assert rel_rmse(logits, want) <= TOL
    if ref.aux_loss is None:
        assert aux is None
    else:
        assert abs(float(aux) - float(ref.aux_loss)) <= TOL * abs(float(ref.aux_loss))
    assert state_bytes(ours, x[:1]) == state_bytes(ref, torch.as_tensor(x[:1]))
    assert n_params(ours) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("heads", [1])  # 3 heads: end to end in test_jax_tasks.py
def test_moons_memory_matches_torch(heads):
    ref = moons_model.MoonsMemory(heads, seed=4)
    ours = JaxMoonsMemory(heads, seed=4, beta=moons_model.BETA)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert ours.state_dict().keys() == sd.keys()
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    x = moons.sample(np.random.default_rng(0), [moons.HELD_OUT] * 2, 40)
    with torch.no_grad():
        want = ref(torch.as_tensor(x)).numpy()
    assert rel_rmse(ours(jnp.asarray(x)), want) <= TOL
    errs = moons.rollout_error(ref, x, [1, 9], horizon=5)
    got = moons.rollout_error_jax(ours, x, [1, 9], horizon=5, bucket=16)
    np.testing.assert_allclose(got, errs, rtol=1e-4)


def test_pad_positions():
    mask = np.zeros((2, 5), bool)
    mask[0, 1] = mask[1, 0] = mask[1, 4] = True
    pos, w, n = pad_positions(mask)
    assert n == 3 and len(pos) == 4  # padded to a power of two
    np.testing.assert_array_equal(pos[:3], [1, 5, 9])
    np.testing.assert_array_equal(w, [1, 1, 1, 0])
    assert len(pad_positions(np.ones((2, 3), bool))[0]) == 6  # never beyond B * T


def test_bad_arguments():
    spec = mqar_configs.model_spec("transformer", CFG)
    with pytest.raises(TypeError, match="spec must be a memcore model spec"):
        task_model("jax", spec.layers[0], 0)
    model = task_model("jax", spec, 0)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=64\)"):
        check_inputs(model, np.asarray([[0, 64]]))
    with pytest.raises(ValueError, match="tokens must be a \\[batch, T\\]"):
        check_inputs(model, np.asarray([0, 1]))
    with pytest.raises(ValueError, match="state_bytes: tokens must be \\[1, T\\]"):
        state_bytes(model, np.zeros((2, 3), np.int64))
    sd = state_dict(model)
    sd.pop("model.embed.weight")
    with pytest.raises(ValueError, match="parameter names differ"):
        load_state_dict(model, sd)
    sd = state_dict(model)
    sd["model.embed.weight"] = sd["model.embed.weight"][:3]
    with pytest.raises(ValueError, match="model.embed.weight has shape"):
        load_state_dict(model, sd)
    with pytest.raises(ValueError, match="heads must be 1 or 3"):
        JaxMoonsMemory(2)
