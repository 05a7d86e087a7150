"""The persistent readout (DESIGN 2.6): ``softmax(k . mem_k) mem_v`` per head over learned
slots. A small einsum pair: torch on every device."""

from __future__ import annotations

import torch
from memcore.spec.validate import check_persistent_readout_args

from .numerics import acc_dtype


def persistent_readout(k, mem_k, mem_v):
    """k [..., H, E]; mem_k, mem_v [H, P, E] -> [..., H, E] in k's dtype."""
    check_persistent_readout_args(k, mem_k, mem_v)
    acc = acc_dtype(k.dtype)
    w = torch.softmax(torch.einsum("...he,hpe->...hp", k.to(acc), mem_k.to(acc)), dim=-1)
    return torch.einsum("...hp,hpe->...he", w, mem_v.to(acc)).to(k.dtype)
