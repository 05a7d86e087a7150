"""Numerics of the torch backend: the accumulation dtype, the pointwise functions, the norms
and the split softmax (partial softmaxes over disjoint key sets, merged by log-sum-exp).

The formulas match the reference exactly (same softplus, same L2 floor, same norm epsilon), so
the backend and the reference differ only by rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from memcore.spec.constants import L2_EPS, NORM_EPS

NEG_INF = -math.inf


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(dtype, *arrays):
    """Each array in ``dtype`` (None stays None)."""
    return [None if a is None else a.to(dtype) for a in arrays]


def linear(x, weight):
    return F.linear(x, weight)


def softplus(x):
    # The reference's formula: torch's softplus switches to x above a threshold.
    e = torch.log1p(torch.exp(-x.abs()))
    return torch.where(x > 0, x + e, e)


def fast_softplus(x):
    # log(1 + e^x), fused; above the threshold it returns x, off by log1p(e^-40) ~ 4e-18
    # relative, far below every tolerance (the reference's formula takes seven kernels).
    return F.softplus(x, threshold=40.0)


def silu(x):
    return F.silu(x)


def sigmoid(x):
    return torch.sigmoid(x)


def gelu(x):
    return F.gelu(x, approximate="tanh")


def l2_normalize(x):
    return F.normalize(x, dim=-1, eps=L2_EPS)


def rms_norm(x, weight):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + NORM_EPS) * weight


def layer_norm(x, weight):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + NORM_EPS) * weight


def default_scale(E: int) -> float:
    """The softmax scale of the windowed readout, 1/sqrt(E)."""
    return 1.0 / math.sqrt(E)


def partial(scores, mask, values):
    """(m, l, acc) of a masked softmax: m the row max (-inf for a row with no key), l the sum
    of exp(s - m), acc the sum of exp(s - m) v. scores, mask [..., Q, S]; values [..., S, E]."""
    s = scores.masked_fill(~mask, NEG_INF)
    m = s.amax(-1, keepdim=True).detach() if s.shape[-1] else torch.full_like(
        s[..., :1], NEG_INF)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(s - m_safe)  # masked entries: exp(-inf) = 0, and no gradient
    return m, w.sum(-1, keepdim=True), w @ values


def combine(parts):
    """Normalised readout from partial softmaxes over disjoint key sets; 0 for empty rows."""
    if len(parts) == 1:
        _, l, acc = parts[0]
    else:
        M = parts[0][0]
        for m, _, _ in parts[1:]:
            M = torch.maximum(M, m)
        M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
        l = acc = 0
        for m, li, ai in parts:
            f = torch.exp(m - M)  # m = -inf: the source has no key for this row
            l = l + li * f
            acc = acc + ai * f
    return acc / torch.where(l > 0, l, torch.ones_like(l))
