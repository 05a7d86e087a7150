"""Small memcore models as transformers models, one per realization kind.

The factories are fixtures (``hf_model``), so a test module imports nothing of transformers
before it has checked that transformers is installed."""

from __future__ import annotations

import pytest
import torch

D, V = 16, 32


def _specs():
    import memcore

    S = memcore.spec
    return {
        "mamba": lambda: S.model([S.mamba(D, d_state=4)], vocab_size=V),
        "transformer": lambda: S.model([S.transformer(D, 2)], vocab_size=V),
        "transformer_window": lambda: S.model([S.transformer(D, 2, window=4)], vocab_size=V),
        "bmojo_f": lambda: S.model([S.bmojo_f(D, 2, window=4, d_state=4)], vocab_size=V),
        "bmojo": lambda: S.model([S.bmojo(D, 2, window=4, chunk=4, select=1, capacity=2,
                                          d_state=4)], vocab_size=V),
        "mosaic": lambda: S.model([S.mosaic(D, 2)], vocab_size=V, ffn="persistent"),
        "jamba": lambda: S.jamba(D, 2, pattern="MA", vocab_size=V, d_state=4),
    }


@pytest.fixture
def spec_of():
    """kind -> a small model spec."""
    specs = _specs()
    return lambda kind: specs[kind]()


@pytest.fixture
def hf_model(spec_of):
    """kind -> a MemcoreForCausalLM in eval mode (float64 by default).

    The weight matrices past the embedding are scaled by 3: at memcore.init's scale a tiny
    model with a tied head mostly predicts the token it reads, and a continuation that
    repeats one token would check the streaming state on one token only."""

    def make(kind, dtype=torch.float64, seed=0, scale=3.0, **config):
        from transformers import AutoModelForCausalLM

        from memcore.hf import MemcoreConfig

        cfg = MemcoreConfig(spec=spec_of(kind), init_seed=seed, **config)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != "model.embed.weight" and p.ndim == 2:
                    p.mul_(scale)
        return model

    return make


@pytest.fixture
def tokens():
    """(batch, T, seed) -> token ids in [0, V), seeded."""
    return lambda B, T, seed=0: torch.randint(0, V, (B, T),
                                              generator=torch.Generator().manual_seed(seed))
