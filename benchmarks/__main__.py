"""`python -m benchmarks [torch_cpu|gpu] [args]`: run one benchmark module (default torch_cpu)."""

from __future__ import annotations

import importlib
import sys

NAMES = ("torch_cpu", "jax_cpu", "gpu")

if __name__ == "__main__":
    args = sys.argv[1:]
    name = args.pop(0) if args and args[0] in NAMES else "torch_cpu"
    importlib.import_module(f"benchmarks.{name}").main(args)
