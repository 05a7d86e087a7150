"""Installed packages that a memcore checkout's top-level folders would shadow.

The checkout keeps `spec/`, `backends/` and `kernels/` at its root (they install as memcore.spec,
memcore.backends and memcore.kernels). Python run from the root, or `python -m pytest`, puts the
root on sys.path, and then `import kernels` finds memcore's folder instead of Hugging Face's
`kernels` package, which transformers (5.25 on) imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def import_installed(name: str, ours: str) -> None:
    """Import the installed top-level package `name` where `ours` (memcore's package of the same
    folder) would be found under that name; elsewhere, and where none is installed, do nothing.

    `import_installed("kernels", "memcore.kernels")` before transformers is imported."""
    if name in sys.modules:
        return
    try:
        found, mine = importlib.util.find_spec(name), importlib.util.find_spec(ours)
    except (ImportError, ValueError):
        return
    if found is None or mine is None or found.origin != mine.origin:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(found.origin)))
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module(name)
    except ImportError:  # not installed: transformers finds no `kernels` and goes without
        sys.modules.pop(name, None)
    finally:
        sys.path[:] = saved
