"""Fail when a package folder is missing from pyproject.toml's explicit package list, and check
that the installed distribution maps spec/ and kernels/ under memcore (never top level)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import tomllib

root = pathlib.Path(__file__).resolve().parent.parent
conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
dirs = conf["package-dir"]
listed = set(conf["packages"])
found = set()
for name, folder in dirs.items():
    for init in (root / folder).rglob("__init__.py"):
        rel = init.parent.relative_to(root / folder)
        found.add(".".join([name, *rel.parts]) if rel.parts else name)
missing = sorted(found - listed)
stale = sorted(listed - found)
problems = []
if missing:
    problems.append(f"package folders not listed in pyproject.toml [tool.setuptools].packages: "
                    f"{missing}")
if stale:
    problems.append(f"listed packages with no folder: {stale}")
for top in ("spec", "kernels", "backends"):
    spec = importlib.util.find_spec(top)
    # Another distribution may own the name (transformers pulls Hugging Face's `kernels`): only
    # a top-level name that resolves to this checkout's folder is wrong.
    origin = pathlib.Path(spec.origin).parent.resolve() if spec and spec.origin else None
    if origin == root / top:
        problems.append(f"'{top}' is importable as a top-level package ({spec.origin})")
if problems:
    sys.exit("\n".join(problems))
print(f"packages: {len(found)} folders, all listed")
