"""Numerics of the JAX backend: the accumulation dtype, projections, activations, norms, and
the pieces of a softmax split over several key sources.

Everything mirrors ``memcore.spec.reference.numerics`` so results agree to rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from memcore.spec.constants import L2_EPS, NORM_EPS

POS_DTYPE = jnp.int32  # positions fit in 31 bits; int32 keeps states identical with x64 off


def acc_dtype(dtype):
    """float64 stays float64; every other float type accumulates in float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def as_acc(dtype, *arrays):
    """The arrays (None kept) in the accumulation dtype of ``dtype``."""
    acc = acc_dtype(dtype)
    return [None if a is None else jnp.asarray(a).astype(acc) for a in arrays]


def is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def linear(x, weight, bias=None):
    """x @ weight.T (+ bias), weight in torch's [out, in] layout."""
    y = jnp.matmul(x, weight.T)
    return y if bias is None else y + bias


def softplus(x):
    return jnp.where(x > 0, x + jnp.log1p(jnp.exp(-jnp.abs(x))), jnp.log1p(jnp.exp(-jnp.abs(x))))


def sigmoid(x):
    e = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(x):
    return x * sigmoid(x)


def gelu(x):
    # The tanh form, as the reference (the Array API has no erf).
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x * x * x)))


def l2_normalize(x, axis: int = -1):
    n = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(n, jnp.asarray(L2_EPS, dtype=x.dtype))


def rms_norm(x, weight, eps: float = NORM_EPS):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def layer_norm(x, weight, eps: float = NORM_EPS):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * weight


def heads(x, H: int):
    """[..., H * E] -> [..., H, E]."""
    return x.reshape(x.shape[:-1] + (H, x.shape[-1] // H))


# --- a softmax over several sources, one partial per source --------------------------------
# A partial is (m, l, o): the row max of the allowed scores, the sum of exp(score - m) and the
# exp-weighted sum of values. Combining partials gives exactly one softmax over the union,
# without concatenating the sources.

def partial(scores, mask, values, bad=None):
    """scores, mask: [..., Q, S]; values: [..., S, E] -> (m [..., Q], l [..., Q], o [..., Q, E]).
    ``bad`` [..., S]: the flags of ``finite_values`` when the values are already cleaned."""
    if scores.shape[-1] == 0:
        lead = scores.shape[:-1]
        return (jnp.full(lead, -jnp.inf, scores.dtype), jnp.zeros(lead, scores.dtype),
                jnp.zeros(lead + (values.shape[-1],), values.dtype))
    # -inf before the max, so masked entries neither overflow nor carry gradient.
    s = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
    return m, jnp.sum(w, axis=-1), masked_matmul(w, mask, values, bad)


@jax.custom_jvp
def _zero_nonfinite(values):
    return jnp.where(jnp.isfinite(values), values, jnp.zeros((), values.dtype))


@_zero_nonfinite.defjvp
def _zero_nonfinite_jvp(primals, tangents):
    # The identity wherever the values are finite, which is all that gradients promise. The
    # where's own derivative (a select on the cotangent) measured 1.7x slower on the CPU
    # for a mosaic layer's forward + backward; the identity costs nothing.
    return _zero_nonfinite(primals[0]), tangents[0]


def finite_values(values):
    """values [..., S, E] -> (the values with non-finite entries zeroed, bad [..., S]: whether
    entry s held one). A source gathered into blocks cleans before gathering, once per key."""
    return _zero_nonfinite(values), ~jnp.all(jnp.isfinite(values), axis=-1)


def masked_matmul(w, mask, values, bad=None):
    """w @ values for weights w [..., Q, S] that are zero wherever ``mask`` is false, exact
    for non-finite values: a masked 0 times a NaN or an infinity would be NaN and reach every
    row (a later token's value into earlier rows). Non-finite values are zeroed before the
    product (``bad`` given: they already are); a row whose mask holds a non-finite value reads
    NaN, as a step-by-step product over the visible entries would."""
    if bad is None:
        values, bad = finite_values(values)
    out = jnp.matmul(w, values)
    hit = jnp.any(mask & bad[..., None, :], axis=-1)  # [..., Q]
    return jnp.where(hit[..., None], jnp.asarray(jnp.nan, out.dtype), out)


def combine(parts):
    """One softmax readout from the partials of every source; a row with nothing reads 0."""
    ms = jnp.stack([p[0] for p in parts])
    top = jnp.max(ms, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    den, num = 0.0, 0.0
    for m, l, o in parts:
        scale = jnp.where(jnp.isfinite(m), jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - top), 0.0)
        den = den + l * scale
        num = num + o * scale[..., None]
    den = jnp.where(den > 0, den, 1.0)
    return num / den[..., None]
