"""Numerics of the reference: namespaces, the accumulation dtype, and the elementwise and
normalisation functions every primitive and layer uses.

Everything here works on any Array API namespace (numpy, torch, JAX through array_api_compat),
never mutates an array in place (JAX arrays are immutable), and stays differentiable under torch
autograd.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np

from ..constants import L2_EPS, NORM_EPS


def namespace(*arrays):
    return array_api_compat.array_namespace(*arrays)


def device(x):
    return array_api_compat.device(x)


def acc_dtype(xp, dtype):
    """float64 stays float64; every other float type accumulates in float32."""
    return xp.float64 if dtype == xp.float64 else xp.float32


def to_xp(xp, value, like):
    """``value`` (numpy, or an array of ``xp``) as an array of ``xp`` with ``like``'s dtype and
    device; an array already of ``xp`` is cast, which keeps it on the autograd graph."""
    if isinstance(value, np.ndarray) or np.isscalar(value) or isinstance(value, (list, tuple)):
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating):
            return xp.asarray(arr, dtype=like.dtype, device=device(like))
        return xp.asarray(arr, device=device(like))
    if array_api_compat.is_array_api_obj(value) and namespace(value) is not xp:
        return xp.asarray(np.asarray(value), dtype=like.dtype, device=device(like))
    if xp.isdtype(value.dtype, "real floating") and value.dtype != like.dtype:
        return xp.astype(value, like.dtype)
    return value


def params_as(xp, params: dict, like) -> dict:
    out = {}
    for name, value in params.items():
        try:
            out[name] = to_xp(xp, value, like)
        except (RuntimeError, TypeError) as e:
            # e.g. a torch parameter that requires grad cannot become a numpy array
            raise TypeError(
                f"params[{name!r}] is a {type(value).__module__}.{type(value).__name__} and cannot "
                f"join an input of {type(like).__module__}.{type(like).__name__}: pass the input "
                f"in the parameters' array library (gradients cannot cross libraries), or detach "
                f"the parameters ({e})") from e
    return out


def linear(xp, x, weight, bias=None):
    """x @ weight.T (+ bias), weight in torch's [out, in] layout."""
    y = xp.matmul(x, xp.permute_dims(weight, (1, 0)))
    return y if bias is None else y + bias


def softplus(xp, x):
    # log1p(exp(x)) overflows for large x; softplus(x) = x + log1p(exp(-x)) there.
    return xp.where(x > 0, x + xp.log1p(xp.exp(-xp.abs(x))), xp.log1p(xp.exp(-xp.abs(x))))


def sigmoid(xp, x):
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(xp, x):
    return x * sigmoid(xp, x)


def gelu(xp, x):
    # tanh approximation: Array API has no erf.
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + xp.tanh(c * (x + 0.044715 * x * x * x)))


def l2_normalize(xp, x, axis: int = -1):
    n = xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))
    return x / xp.maximum(n, xp.asarray(L2_EPS, dtype=x.dtype, device=device(x)))


def rms_norm(xp, x, weight, eps: float = NORM_EPS):
    ms = xp.mean(x * x, axis=-1, keepdims=True)
    return x / xp.sqrt(ms + eps) * weight


def layer_norm(xp, x, weight, eps: float = NORM_EPS):
    mu = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + eps) * weight


def masked_softmax_readout(xp, scores, mask, values):
    """sum_j softmax_j(scores | mask) values_j along the last axis of ``scores``.

    scores, mask: [..., Q, S]; values: [..., S, E]. A row with no allowed entry reads 0.
    Masked scores become -inf before the max, so large masked values can neither overflow
    nor leak gradient.
    """
    if scores.shape[-1] == 0:
        return xp.zeros(tuple(scores.shape[:-1]) + (values.shape[-1],), dtype=values.dtype,
                        device=device(values))
    neg_inf = xp.asarray(-math.inf, dtype=scores.dtype, device=device(scores))
    s = xp.where(mask, scores, neg_inf)
    m = xp.max(s, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    w = xp.where(mask, xp.exp(s - m), xp.zeros_like(s))
    den = xp.sum(w, axis=-1, keepdims=True)
    den = xp.where(den > 0, den, xp.ones_like(den))
    return masked_matmul(xp, w / den, mask, values)


def masked_matmul(xp, w, mask, values):
    """``w @ values`` for weights ``w`` [..., Q, S] that are zero wherever ``mask`` is False.

    A plain matmul would give 0 * NaN = NaN in every row, so a later token's NaN or infinity
    would reach earlier rows. Non-finite values are zeroed before the matmul instead, and a
    row is set to NaN exactly when its mask admits a non-finite value (as a step that reads
    that value computes). On finite values the result is the plain matmul's, bit for bit.
    """
    bad = xp.any(~xp.isfinite(values), axis=-1, keepdims=True)  # [..., S, 1]
    y = xp.matmul(w, xp.where(bad, xp.zeros_like(values), values))
    hits = xp.matmul(xp.astype(mask, y.dtype), xp.astype(bad, y.dtype)) > 0  # [..., Q, 1]
    return xp.where(hits, xp.asarray(math.nan, dtype=y.dtype, device=device(y)), y)


def gather_rows(xp, pick, values):
    """The rows of ``values`` [..., S, E] that ``pick`` [..., n, S] (bool, at most one True per
    row) selects, as [..., n, E]; a row that selects nothing is zero. Leading axes broadcast.

    An index gather, not a one-hot matmul: it copies each row verbatim (a NaN or infinity
    stays in its own row and element, as a step's write keeps it) and passes gradients to
    exactly the rows it reads.
    """
    lead = tuple(np.broadcast_shapes(tuple(pick.shape[:-2]), tuple(values.shape[:-2])))
    n, S, E = pick.shape[-2], values.shape[-2], values.shape[-1]
    if S == 0:
        return xp.zeros(lead + (n, E), dtype=values.dtype, device=device(values))
    idx = xp.argmax(xp.astype(pick, xp.int64), axis=-1)  # [..., n]; 0 where nothing is picked
    idx = xp.broadcast_to(idx[..., None], lead + (n, E))
    rows = xp.take_along_axis(xp.broadcast_to(values, lead + (S, E)), idx, axis=-2)
    found = xp.any(pick, axis=-1, keepdims=True)  # [..., n, 1]
    return xp.where(found, rows, xp.zeros_like(rows))


def cast_out(xp, y, dtype):
    return y if y.dtype == dtype else xp.astype(y, dtype)
