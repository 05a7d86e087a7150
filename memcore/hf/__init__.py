"""memcore models in Hugging Face transformers (``pip install "memcore[hf]"``).

    from transformers import AutoModelForCausalLM
    from memcore.hf import MemcoreConfig
    config = MemcoreConfig(spec=memcore.spec.jamba(d_model=64, n_heads=4, vocab_size=256))
    model = AutoModelForCausalLM.from_config(config)       # memcore.init(spec, config.init_seed)
    out = model(input_ids, labels=input_ids)               # out.loss, out.logits, out.cache
    tokens = model.generate(input_ids, max_new_tokens=8)   # the state is the cache

Importing this package registers ``MemcoreConfig`` (model type "memcore") with ``AutoConfig``
and ``MemcoreForCausalLM`` with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from memcore.shadowed_packages import import_installed

try:
    import_installed("kernels", "memcore.kernels")  # before transformers, which imports it
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('memcore.hf needs transformers: pip install "memcore[hf]"') from err

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import MemcoreCache
from .configuration import MODEL_TYPE, MemcoreConfig
from .modeling import MemcoreCausalLMOutput, MemcoreForCausalLM

AutoConfig.register(MODEL_TYPE, MemcoreConfig, exist_ok=True)
AutoModelForCausalLM.register(MemcoreConfig, MemcoreForCausalLM, exist_ok=True)

__all__ = ["MemcoreConfig", "MemcoreForCausalLM", "MemcoreCache", "MemcoreCausalLMOutput"]
