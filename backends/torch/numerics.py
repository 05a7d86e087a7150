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


def rms_norm(x, weight, eps: float = NORM_EPS):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x, weight, eps: float = NORM_EPS):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight


def default_scale(E: int) -> float:
    """The softmax scale of the windowed readout, 1/sqrt(E)."""
    return 1.0 / math.sqrt(E)


def all_finite(*arrays) -> bool:
    """Whether every entry of the arrays is finite, from one sum each: a sum is finite only
    if all its terms are (one that overflows reads as not finite, which sends a call to its
    exact path for non-finite values, only slower). The caller's fast path for finite
    arrays then costs one reduction and, on a GPU, a host sync."""
    return bool(torch.isfinite(sum(a.detach().sum() for a in arrays)))


def finite_values(values):
    """(values with every non-finite entry set to 0, [...] whether each row held one). A
    product with masked weights then reads no non-finite value it was not meant to see; the
    rows it was meant to see are marked instead (``mark_seen``)."""
    ok = torch.isfinite(values)
    return torch.where(ok, values, 0.0), ~ok.all(-1)


def mark_seen(out, seen):
    """``out`` [..., Q, E] with NaN in the rows where ``seen`` [..., Q] holds."""
    return out.masked_fill(seen[..., None], math.nan)


def nan_rows(out):
    """``out`` [..., E] with every row that holds a non-finite entry all NaN: a product with
    the values a row sees is non-finite in the channels where one of them is, and a row that
    sees a non-finite value reads NaN in every channel (what ``mark_seen`` writes)."""
    return out.masked_fill(~torch.isfinite(out).all(-1, keepdim=True), math.nan)


def partial(scores, mask, values, masked_zero: bool = False):
    """(m, l, acc) of a masked softmax: m the row max (-inf for a row with no key), l the sum
    of exp(s - m), acc the sum of exp(s - m) v. scores, mask [..., Q, S]; values [..., S, E].

    Masked values are never multiplied in (DESIGN 6): a row that sees a non-finite value
    reads NaN, one that does not is exact, whatever the masked values hold. ``masked_zero``:
    the masked values are zeros (a ring's empty slots) and are read as they are, each row
    non-finite in the channels where a value it sees is."""
    s = scores.masked_fill(~mask, NEG_INF)
    m = s.amax(-1, keepdim=True).detach() if s.shape[-1] else torch.full_like(
        s[..., :1], NEG_INF)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(s - m_safe)  # masked entries: exp(-inf) = 0, and no gradient
    if masked_zero or all_finite(values):
        return m, w.sum(-1, keepdim=True), w @ values
    if s.shape[-2] == 1:  # one query: select its keys' values (its visible ones propagate)
        acc = nan_rows(w @ torch.where(mask.transpose(-1, -2), values, 0.0))
        return m, w.sum(-1, keepdim=True), acc
    v0, bad = finite_values(values)
    seen = (mask & bad[..., None, :]).any(-1)
    return m, w.sum(-1, keepdim=True), mark_seen(w @ v0, seen)


def sdpa(q, k, v, mask=None, scale=None):
    """scaled_dot_product_attention of q [..., L, E] over k, v [..., S, E] with a boolean
    ``mask`` [..., L, S] (None: causal, row i sees keys j <= i), where no masked key or value
    reaches a row (DESIGN 6). Finite arrays go to torch's kernel as they are. Its kernels
    multiply masked values by a weight of 0 (0 * NaN = NaN), so non-finite values are read
    zeroed and the rows that see one are NaN; some of its paths (a mask, strided inputs) add
    the mask to masked keys' scores (NaN + -inf = NaN), and on CPU a row whose scores are NaN
    reads 0, so a non-finite query or key takes the masked softmax of ``partial`` instead (in
    blocks of queries), which reads keys only through ``where``."""
    # torch's fused CPU kernel takes only a unit stride on the last dim; any other layout falls
    # to its math path, which materialises the scores and is several times slower.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if all_finite(q, k, v):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    L, S = q.shape[-2], k.shape[-2]
    if mask is None:
        i = torch.arange(L, device=q.device)
        mask = torch.arange(S, device=q.device)[None, :] <= i[:, None]
    if not all_finite(q, k):
        return _masked_softmax(q, k, v, mask, default_scale(q.shape[-1]) if scale is None
                               else scale)
    v0, bad = finite_values(v)
    seen = (mask.to(v0.dtype) @ bad.to(v0.dtype)[..., None])[..., 0] > 0
    return mark_seen(F.scaled_dot_product_attention(q, k, v0, attn_mask=mask, scale=scale),
                     seen)


SOFTMAX_ELEMENTS = 1 << 22  # scores per block of queries of ``_masked_softmax``


def _masked_softmax(q, k, v, mask, scale: float):
    L, S = q.shape[-2], k.shape[-2]
    lead = max(1, q[..., 0, 0].numel())
    step = max(1, SOFTMAX_ELEMENTS // max(1, lead * S))
    mask = mask.expand(*mask.shape[:-2], L, S)
    outs = [combine([partial((q[..., i:i + step, :] @ k.transpose(-1, -2)) * scale,
                             mask[..., i:i + step, :], v)]) for i in range(0, L, step)]
    return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]


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
