"""The persistent readout (DESIGN 2.6): ``softmax(k . mem_k) mem_v`` per head over learned
slots. Two batched matmuls: torch on every device."""

from __future__ import annotations

import math

import torch
from memcore.spec.validate import check_persistent_readout_args

from .numerics import acc_dtype


def persistent_readout(k, mem_k, mem_v):
    """k [..., H, E]; mem_k, mem_v [H, P, E] -> [..., H, E] in k's dtype."""
    check_persistent_readout_args(k, mem_k, mem_v)
    acc = acc_dtype(k.dtype)
    # heads first, so that the scores are contiguous in the slots the softmax runs over
    kh = k.to(acc).movedim(-2, 0)  # [H, ..., E]
    rows = kh.reshape(kh.shape[0], math.prod(kh.shape[1:-1]), kh.shape[-1])  # [H, N, E]
    w = torch.softmax(rows @ mem_k.to(acc).transpose(1, 2), dim=-1)  # [H, N, P]
    return (w @ mem_v.to(acc)).reshape(kh.shape).movedim(0, -2).to(k.dtype)
