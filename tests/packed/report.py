"""Runs the packed-sequence tests and prints the largest packed-vs-separate relative error
seen per tree and realization (``packed_cases.ERRORS``):

    .venv/bin/python tests/packed/report.py [pytest arguments]
"""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from tests.packed.packed_cases import ERRORS  # noqa: E402


def main(argv) -> int:
    rc = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "packed"), *argv])
    print(f"\n{'tree':<10} {'realization / primitive':<28} max relative error")
    for (tree, name), err in sorted(ERRORS.items()):
        print(f"{tree:<10} {name:<28} {err:.2e}")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
