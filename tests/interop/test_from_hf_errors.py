"""``memcore.interop.from_hf`` refuses what it cannot map, naming the config field (or the
parameter), and refuses what is not one of the three causal LMs."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers", reason="from_hf maps transformers models (memcore[hf])")

import transformers

from memcore.interop import from_hf
from tests.interop.hf_cases import build


@pytest.mark.parametrize("kind, config, field", [
    ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
    ("mistral", {"head_dim": 8}, "head_dim"),
    ("mistral", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                     "factor": 2.0}}, "rope_parameters['rope_type']"),
    ("mamba", {"use_bias": True}, "use_bias"),
    ("mamba", {"hidden_act": "gelu"}, "hidden_act"),
    ("mamba", {"intermediate_size": 24}, "intermediate_size"),
    ("jamba", {"num_experts": 2, "expert_layer_period": 2, "expert_layer_offset": 1},
     "num_experts"),
    ("jamba", {"mamba_proj_bias": True}, "mamba_proj_bias"),
    ("jamba", {"hidden_act": "relu"}, "hidden_act"),
])
def test_unsupported_config_is_refused_by_name(kind, config, field):
    model = build(kind, **config)
    with pytest.raises(ValueError, match=re.escape(f"config.{field}=")):
        from_hf(model)


def test_unmapped_parameter_is_refused_by_name():
    model = build("mistral")
    model.model.layers[0].self_attn.q_proj.register_parameter(
        "bias", torch.nn.Parameter(torch.zeros(16, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        from_hf(model)


def test_refuses_other_models():
    with pytest.raises(TypeError, match="MambaForCausalLM, MistralForCausalLM or "
                                        "JambaForCausalLM.*LlamaForCausalLM"):
        from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=2)))
    with pytest.raises(TypeError, match="model must be"):
        from_hf(torch.nn.Linear(2, 2))


def test_refuses_a_model_without_head():
    base = build("mistral").model  # MistralModel: no lm_head
    with pytest.raises(TypeError, match="lm_head|model must be"):
        from_hf(base)
