"""Shared pieces of the tests of the torch backend's choice between the Triton kernels and the
torch path (``implementation=``, ``MEMCORE_KERNELS``): the two settings, and a record of the
kernel calls each one makes."""

from __future__ import annotations

import pytest
import torch
from memcore.backends.torch import implementation

F64 = torch.float64  # both paths are compared with the reference in float64

# Each such test runs once with the kernels forced on and once with them forced off.
both_paths = pytest.mark.parametrize("mode", ["triton", "torch"])


def spy(monkeypatch, module, name):
    """``module.name`` still runs, and each call appends ``name`` to the returned list."""
    calls = []
    real = getattr(module, name)

    def wrapped(*a, **kw):
        calls.append(name)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def take_path(monkeypatch, mode, module, name):
    """``MEMCORE_KERNELS`` set to ``mode``; the calls of the kernel ``module.name`` recorded."""
    monkeypatch.setenv(implementation.ENV, mode)
    return spy(monkeypatch, module, name)
