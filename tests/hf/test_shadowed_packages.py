"""The checkout's top-level kernels/ folder does not hide Hugging Face's `kernels` package."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

from memcore.shadowed_packages import import_installed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _package(where: pathlib.Path, name: str, value: str) -> None:
    (where / name).mkdir(parents=True)
    (where / name / "__init__.py").write_text(f"WHO = {value!r}\n")


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.setattr(sys, "path", sys.path[:])
    yield monkeypatch
    for name in ("pkg_shadow_a", "pkg_shadow_b"):
        sys.modules.pop(name, None)


def test_the_installed_package_wins_over_the_checkout_folder(tmp_path, clean):
    _package(tmp_path / "checkout", "pkg_shadow_a", "checkout")
    _package(tmp_path / "site", "pkg_shadow_a", "installed")
    sys.path[:0] = [str(tmp_path / "checkout"), str(tmp_path / "site")]
    import_installed("pkg_shadow_a", "pkg_shadow_a")
    assert sys.modules["pkg_shadow_a"].WHO == "installed"
    assert sys.path[0] == str(tmp_path / "checkout")  # sys.path is given back


def test_nothing_is_bound_where_only_the_checkout_has_the_name(tmp_path, clean):
    _package(tmp_path / "checkout", "pkg_shadow_b", "checkout")
    sys.path.insert(0, str(tmp_path / "checkout"))
    import_installed("pkg_shadow_b", "pkg_shadow_b")
    assert "pkg_shadow_b" not in sys.modules


def test_a_name_that_is_not_ours_is_left_alone(tmp_path, clean):
    _package(tmp_path / "site", "pkg_shadow_a", "installed")
    sys.path.insert(0, str(tmp_path / "site"))
    import_installed("pkg_shadow_a", "memcore.kernels")
    assert "pkg_shadow_a" not in sys.modules


def test_memcore_hf_imports_from_the_checkout_root():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed: nothing to shadow")
    code = "import memcore.hf, kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert not pathlib.Path(out.stdout.strip()).is_relative_to(ROOT / "kernels")
