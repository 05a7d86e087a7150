"""MemcoreConfig, registration with the Auto classes, initial weights, and the
save_pretrained / from_pretrained round trip through safetensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="memcore.hf needs transformers (memcore[hf])")


def _memcore_params(model) -> dict:
    return {n[len("model."):]: p for n, p in model.named_parameters()}


def test_config_holds_the_spec_and_round_trips(spec_of, tmp_path):
    from transformers import AutoConfig

    from memcore.hf import MemcoreConfig

    spec = spec_of("mosaic")
    cfg = MemcoreConfig(spec=spec, init_seed=4, aux_loss_weight=0.25)
    assert cfg.model_spec == spec
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (32, 16, 1)
    assert MemcoreConfig(spec=spec.to_json()).model_spec == spec
    assert MemcoreConfig(spec=spec.to_dict()).model_spec == spec
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "memcore" and saved["spec"] == spec.to_dict()
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, MemcoreConfig) and back.model_spec == spec
    assert (back.init_seed, back.aux_loss_weight) == (4, 0.25)
    made = AutoConfig.for_model("memcore", spec=spec.to_dict())
    assert isinstance(made, MemcoreConfig) and made.model_spec == spec


def test_config_refuses_what_is_not_a_model_spec(spec_of):
    import memcore
    from memcore.hf import MemcoreConfig

    with pytest.raises(TypeError, match="model spec"):
        MemcoreConfig(spec=memcore.spec.mamba(16))
    with pytest.raises(TypeError, match="spec must be"):
        MemcoreConfig(spec=3)
    with pytest.raises(ValueError, match="not valid JSON"):
        MemcoreConfig(spec="{")
    with pytest.raises(ValueError, match="init_seed"):
        MemcoreConfig(spec=spec_of("mamba"), init_seed=-1)
    with pytest.raises(ValueError, match="aux_loss_weight"):
        MemcoreConfig(spec=spec_of("mamba"), aux_loss_weight=-0.5)
    with pytest.raises(ValueError, match="spec is not set"):
        _ = MemcoreConfig().model_spec
    from memcore.hf import MemcoreForCausalLM

    with pytest.raises(TypeError, match="MemcoreConfig"):
        MemcoreForCausalLM(object())


def test_from_config_starts_from_memcore_init(spec_of):
    from transformers import AutoModelForCausalLM

    import memcore
    from memcore.hf import MemcoreConfig, MemcoreForCausalLM

    spec = spec_of("bmojo")
    for seed, dtype in ((0, torch.float32), (5, torch.float64)):
        model = AutoModelForCausalLM.from_config(MemcoreConfig(spec=spec, init_seed=seed),
                                                 dtype=dtype)
        assert isinstance(model, MemcoreForCausalLM) and model.dtype == dtype
        want = memcore.init(spec, seed=seed, dtype=np.float64 if dtype == torch.float64
                            else np.float32)
        got = _memcore_params(model)
        assert set(got) == set(want)
        for n, a in want.items():
            assert torch.equal(got[n].detach(), torch.from_numpy(a)), n
    other = _memcore_params(MemcoreForCausalLM(MemcoreConfig(spec=spec, init_seed=6)))
    assert not torch.equal(other["embed.weight"], got["embed.weight"].float())


def test_init_weights_writes_memcore_values_not_transformers_defaults(spec_of):
    """transformers' generic rule would draw Linear weights from N(0, 0.02) and set norms to
    ones; _init_weights restores memcore.init's values instead."""
    import memcore
    from memcore.hf import MemcoreConfig, MemcoreForCausalLM

    spec = spec_of("mamba")
    model = MemcoreForCausalLM(MemcoreConfig(spec=spec, init_seed=2))
    want = memcore.init(spec, seed=2)
    mixer = model.model.layers._modules["0"].mixer
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    for module in model.modules():
        model._init_weights(module)
    for n, p in _memcore_params(model).items():
        assert torch.equal(p.detach(), torch.from_numpy(want[n])), n
    assert mixer.A_log.shape == want["layers.0.mixer.A_log"].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_and_load_round_trip_exactly(hf_model, tokens, tmp_path, dtype):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from memcore.hf import MemcoreForCausalLM

    model = hf_model("jamba", dtype=dtype, seed=3)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))  # no pickle
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(dict(model.named_parameters()))
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(back, MemcoreForCausalLM) and back.dtype == dtype and not back.training
    assert back.config.model_spec == model.config.model_spec
    mine, theirs = dict(model.named_parameters()), dict(back.named_parameters())
    assert set(mine) == set(theirs)
    for n in mine:
        assert torch.equal(mine[n], theirs[n]), n
    ids = tokens(2, 9)
    with torch.no_grad():
        # The loaded tensors sit at other memory alignments, where vectorised CPU kernels may
        # add in another order: the logits agree to a few units in the last place.
        eps = 8 * torch.finfo(dtype).eps
        torch.testing.assert_close(model(ids).logits, back(ids).logits, rtol=eps, atol=eps)


def test_a_parameter_missing_from_the_checkpoint_gets_memcore_init(hf_model, tmp_path):
    from safetensors.torch import load_file, save_file

    import memcore
    from memcore.hf import MemcoreForCausalLM

    model = hf_model("mamba", dtype=torch.float32, seed=1)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.0.mixer.A_log"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    back = dict(MemcoreForCausalLM.from_pretrained(tmp_path).named_parameters())
    init = memcore.init(model.config.model_spec, seed=1)
    assert torch.equal(back["model.layers.0.mixer.A_log"],
                       torch.from_numpy(init["layers.0.mixer.A_log"]))
    for n, p in model.named_parameters():  # the rest is the checkpoint's, scaled weights too
        if n != "model.layers.0.mixer.A_log":
            assert torch.equal(back[n], p), n


def test_registration_can_run_twice():
    import importlib

    from transformers import AutoConfig

    import memcore.hf

    importlib.reload(memcore.hf)  # registers again (exist_ok)
    assert AutoConfig.for_model("memcore").__class__.__name__ == "MemcoreConfig"
