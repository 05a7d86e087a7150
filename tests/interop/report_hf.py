"""Prints the largest absolute logit difference between transformers' models and memcore's
mapping of them (``memcore.interop.from_hf``), per model, dtype, backend and form, on the tiny
random models of the ``from_hf`` tests (``hf_cases``):

    .venv/bin/python tests/interop/report_hf.py
"""

from __future__ import annotations

import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from memcore.interop import from_hf  # noqa: E402
from tests.interop.hf_cases import (  # noqa: E402
    BACKENDS,
    FORMS,
    TOL,
    WINDOW,
    build,
    hf_logits,
    max_error,
    memcore_logits,
    tokens,
)

MODELS = {"MambaForCausalLM": ("mamba", {}),
          "MistralForCausalLM (full)": ("mistral", {"sliding_window": None}),
          f"MistralForCausalLM (window {WINDOW})": ("mistral", {"sliding_window": WINDOW}),
          "JambaForCausalLM (dense)": ("jamba", {})}


def main() -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    tok = tokens()
    print(f"{'model':<30} {'dtype':<8} {'backend':<10} {'form':<10} max |logit diff|  bound")
    worst = 0.0
    for name, (kind, config) in MODELS.items():
        for dtype in (torch.float64, torch.float32):
            model = build(kind, dtype, **config)
            spec, params = from_hf(model)
            want = hf_logits(model, tok)
            for backend in BACKENDS:
                for form in FORMS:
                    err = max_error(memcore_logits(spec, params, tok, backend, form), want)
                    worst = max(worst, err / TOL[dtype])
                    print(f"{name:<30} {str(dtype)[6:]:<8} {backend:<10} {form:<10} "
                          f"{err:.2e}         {TOL[dtype]:.0e}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
