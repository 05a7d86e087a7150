"""Parameters from other projects' modules, mapped onto memcore specs.

    spec, params = memcore.interop.from_hf(transformers_model)  # Mamba, Mistral, Jamba LMs
    spec, params = memcore.interop.from_mamba_ssm(mamba_module.state_dict())
    spec, params = memcore.interop.from_memory_mosaics(stack_asso_mem.state_dict(),
                                                       config={"pre_ln": True, "v_shift": 1})
    spec, params = memcore.interop.from_memory_mosaics(torch.load("ckpt.pt"))  # training script
    layer = memcore.realize(spec, backend="torch", params=params)

from_hf takes a transformers model (``hf``); from_mamba_ssm (``mamba_ssm``) and
from_memory_mosaics (``memory_mosaics``) take a state dict of torch tensors or numpy arrays
(from_memory_mosaics also the model's options, or a training checkpoint that holds them). All
return ``(spec, params)`` with params a dict of numpy arrays under memcore's names
(``memcore.spec.params``). Values are copied, never shared with the source; bfloat16 becomes
float32 (exactly), other float dtypes are kept.
"""

from __future__ import annotations

from .hf import from_hf
from .mamba_ssm import from_mamba_ssm
from .memory_mosaics import from_memory_mosaics

__all__ = ["from_hf", "from_mamba_ssm", "from_memory_mosaics"]
