"""Development sessions: `nox -l` lists them, `nox -s NAME` runs one.

Each session installs torch==2.13.0 first (the CPU build; a bare `torch` requirement would pull
a CUDA build) and then memcore with the extras it needs.
"""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["reference", "torch", "jax", "lint"]
nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"


def _install(session, extras: str, torch: bool = True):
    if torch:
        session.install(TORCH)
    session.install("-e", f".[{extras}]")


def _tests(*prefixes: str) -> list[str]:
    """The test files of one tree: ``tests/<folder>/test_<prefix>*.py`` for each prefix (a
    primitive's tests are found by its folder, a tree's by the file name)."""
    return sorted(f for p in prefixes for f in glob.glob(f"tests/*/test_{p}*.py"))


@nox.session
def reference(session):
    """The Array API reference on numpy, torch and JAX arrays, the specs, memcore.testing."""
    _install(session, "jax,test")
    session.run("pytest", "-q", *_tests("reference"), "tests/specs", "tests/ops/test_routing.py",
                "tests/testing", *session.posargs)


@nox.session
def torch(session):
    """The torch backend, checkpoints and interop (from_hf checks against transformers, in
    the JAX backend too)."""
    _install(session, "jax,hf,test")
    session.run("pytest", "-q", *_tests("torch"), "tests/interop", "tests/checkpoint",
                *session.posargs)


@nox.session
def jax(session):
    """The JAX backend and the cross-backend property tests."""
    _install(session, "jax,test")
    session.run("pytest", "-q", *_tests("jax", "cross_backend"), *session.posargs)


@nox.session
def kernels(session):
    """Triton and Pallas kernels in interpret mode (no GPU needed), and their compile checks."""
    _install(session, "jax,triton,test")
    session.run("pytest", "-q", *_tests("triton", "pallas"), *session.posargs,
                env={"TRITON_INTERPRET": "1"})


@nox.session
def lint(session):
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def benchmarks(session):
    """Side-by-side speed ratios; results go to stdout with the machine named."""
    _install(session, "jax,test")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def demo(session):
    """The main job: the verification table for every realization and target."""
    _install(session, "jax,test")
    session.run("memcore", "verify", *session.posargs)
