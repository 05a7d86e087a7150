"""Count the memcore files and functions one call passes through.

    python tools/call_path.py [--backend torch] [--layer bmojo]

Prints, for ``realize`` and for one parallel forward of a small layer on the CPU, the number of
distinct source files and functions of the memcore package that run (each counted once).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

import memcore

ROOT = pathlib.Path(memcore.__file__).resolve().parent.parent


def _traced(fn):
    seen: set[tuple[str, str]] = set()

    def prof(frame, event, arg):
        if event == "call":
            path = pathlib.Path(frame.f_code.co_filename)
            try:
                rel = path.resolve().relative_to(ROOT)
            except ValueError:
                return
            if rel.parts and rel.parts[0] in ("memcore", "spec", "backends", "kernels"):
                seen.add((str(rel), frame.f_code.co_qualname if hasattr(frame.f_code, "co_qualname")
                          else frame.f_code.co_name))

    sys.setprofile(prof)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--layer", default="bmojo")
    ap.add_argument("--list", action="store_true", help="print every file and function")
    a = ap.parse_args(argv)
    spec = getattr(memcore.spec, a.layer)(**_ARGS[a.layer])
    params = memcore.init(spec, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 40, spec.d_model)).astype(np.float32)
    if a.backend == "torch":
        import torch
        x = torch.from_numpy(x)
    elif a.backend == "jax":
        import jax.numpy as jnp
        x = jnp.asarray(x)
    # Warm up once so that lazy imports and caches are not counted as the call's path.
    layer = memcore.realize(spec, backend=a.backend, params=params)
    layer(x, None)
    layer, realize_seen = _traced(lambda: memcore.realize(spec, backend=a.backend, params=params))
    _, fwd_seen = _traced(lambda: layer(x, None))
    for name, seen in (("realize", realize_seen), ("forward", fwd_seen)):
        files = {f for f, _ in seen}
        print(f"{a.backend} {a.layer} {name}: {len(files)} files, {len(seen)} functions")
        if a.list:
            for f, fn in sorted(seen):
                print(f"    {f}:{fn}")
    return 0


_ARGS = {
    "bmojo": dict(d_model=32, n_heads=2, d_state=4, window=8, chunk=8, select=2, capacity=4),
    "bmojo_f": dict(d_model=32, n_heads=2, d_state=4, window=8),
    "mamba": dict(d_model=32, d_state=4),
    "transformer": dict(d_model=32, n_heads=2, window=8),
    "mosaic": dict(d_model=32, n_heads=2),
}

if __name__ == "__main__":
    raise SystemExit(main())
