"""``memcore.ops`` routes torch tensors to the torch backend's primitive functions, which
refuse bad shapes by name."""

from __future__ import annotations

import pytest
import torch
from memcore.backends.torch import leaky_average as torch_leaky
from primitives import NAMES
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F64, randn, rel, scan_args

import memcore.ops as mops

D64 = torch.float64


def test_memcore_ops_routes_torch_tensors_to_the_backend(monkeypatch):
    calls = []
    real = torch_leaky.leaky_average

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_leaky, "leaky_average", spy)
    g = torch.Generator().manual_seed(0)
    k = randn(g, 1, 4, 2, 3)
    y = mops.leaky_average(k, torch.tensor([-0.5, -1.0], dtype=D64))
    assert calls == [1]
    assert rel(y, R.leaky_average(k, torch.tensor([-0.5, -1.0], dtype=D64))) <= F64
    for names in NAMES.values():
        for name in names:
            assert callable(getattr(O, name)), name


def test_ops_reject_bad_shapes():
    g = torch.Generator().manual_seed(0)
    u, delta, A, B, C, D, z, bias, h0 = scan_args(g, 2, 4, 3, 5, 0)
    with pytest.raises(ValueError, match="delta must have u's shape"):
        O.selective_scan(u, delta[..., :4], A, B, C)
    with pytest.raises(ValueError, match="initial_state must be"):
        O.selective_scan(u, delta, A, B, C, initial_state=h0[:, :3])
    with pytest.raises(ValueError, match="log_decay must be"):
        O.leaky_average(randn(g, 1, 4, 2, 3), torch.zeros(3, dtype=D64))
    q = randn(g, 1, 4, 2, 3)
    with pytest.raises(ValueError, match="window must be an int"):
        O.windowed_readout(q, q, q, None, fading_k=q, fading_v=q)
    with pytest.raises(ValueError, match="k must have q's shape"):
        O.windowed_readout(q, q[:, :3], q, 2)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        O.associative_readout(q, q, 0)
