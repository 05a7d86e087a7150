"""``MemcoreConfig``: a transformers configuration that holds a memcore model spec.

The spec is kept as its JSON object (``Spec.to_dict()``) under ``spec``, so ``config.json``
carries the whole model; ``config.model_spec`` gives the validated ``memcore.spec.Model`` back.
``vocab_size``, ``hidden_size`` and ``num_hidden_layers`` are read from the spec (transformers'
tools look for them) and cannot be set apart from it.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedConfig

from memcore.spec import Model, Spec, from_dict

MODEL_TYPE = "memcore"


def _spec_dict(spec) -> dict | None:
    """The JSON object of a model spec given as a ``Model``, its dict or its JSON text,
    validated by building the spec."""
    if spec is None:
        return None
    if isinstance(spec, (str, bytes, bytearray)):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"MemcoreConfig: spec is not valid JSON: {err}") from None
    if isinstance(spec, dict):
        spec = from_dict(spec)
    if not isinstance(spec, Spec):
        raise TypeError(f"MemcoreConfig: spec must be a memcore model spec "
                        f"(memcore.spec.model(...) or memcore.spec.jamba(...)), its dict or its "
                        f"JSON, got {type(spec).__name__}")
    if not isinstance(spec, Model):
        raise TypeError(f"MemcoreConfig: spec must be a model spec (memcore.spec.model([...], "
                        f"vocab_size=...)), got a {spec.kind!r} layer spec")
    return spec.to_dict()


class MemcoreConfig(PreTrainedConfig):
    """Configuration of ``MemcoreForCausalLM``.

    spec: a memcore model spec (``memcore.spec.model([...], vocab_size=...)``,
        ``memcore.spec.jamba(...)``), its ``to_dict()`` or its JSON.
    init_seed: the seed of ``memcore.init`` for a model built from this configuration.
    aux_loss_weight: weight of the layers' aux loss (B'MOJO's innovation loss, which trains
        the innovation predictor) added to the language-model loss when ``labels`` are given.
    """

    model_type = MODEL_TYPE

    spec: Any = None
    init_seed: int = 0
    aux_loss_weight: float = 0.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False  # the head reads the embedding itself; nothing to tie

    def __post_init__(self, **kwargs):
        self.spec = _spec_dict(self.spec)
        seed = self.init_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"MemcoreConfig: init_seed must be a non-negative int, got {seed!r}")
        w = self.aux_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"MemcoreConfig: aux_loss_weight must be a float >= 0, got {w!r}")
        super().__post_init__(**kwargs)

    @property
    def model_spec(self) -> Model:
        """The model spec, validated (a ValueError if the configuration holds none)."""
        if self.spec is None:
            raise ValueError("MemcoreConfig: spec is not set; pass spec=memcore.spec.model(...)")
        return from_dict(self.spec)

    @property
    def vocab_size(self) -> int | None:
        return None if self.spec is None else self.model_spec.vocab_size

    @property
    def hidden_size(self) -> int | None:
        return None if self.spec is None else self.model_spec.d_model

    @property
    def num_hidden_layers(self) -> int | None:
        return None if self.spec is None else self.model_spec.n_layers
