"""The torch backend's persistent readout vs the reference's, float64 within 1e-9."""

from __future__ import annotations

import pytest
import torch
from primitives import REF as R
from primitives import TORCH as O
from torchcheck import F64, rel

D64 = torch.float64


def _randn(g, *shape, dtype=D64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def test_persistent_readout():
    g = torch.Generator().manual_seed(2)
    k = _randn(g, 2, 5, 3, 4)
    mk, mv = _randn(g, 3, 7, 4), _randn(g, 3, 7, 4)
    assert rel(O.persistent_readout(k, mk, mv), R.persistent_readout(k, mk, mv)) <= F64
    with pytest.raises(ValueError, match="mem_k and mem_v"):
        O.persistent_readout(k, mk[:, :, :3], mv)
