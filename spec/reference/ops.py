"""Array-in/array-out primitives (both forms), the reference behind ``memcore.ops``.

Layouts: heads [B, T, H, E] (streaming [B, H, E]); selective scan channel-major as mamba-ssm.
Every parallel form takes ``initial_state`` and ``return_final_state`` and returns
``out`` or ``(out, final_state)``; every streaming form returns ``(out_t, state)``.
"""

from __future__ import annotations

from ..validate import check_attention_args
from . import store as _store
from ._xp import acc_dtype, cast_out, device, masked_softmax_readout, namespace
from .attention import (
    fading_source,
    fading_source_step,
    raw_source,
    raw_source_step,
    readout,
)
from .scan import leaky_average, leaky_average_step, selective_scan, selective_state_update

__all__ = [
    "selective_scan", "selective_state_update", "leaky_average", "leaky_average_step",
    "windowed_attention", "windowed_attention_step", "windowed_attention_state",
    "associative_readout", "persistent_readout", "store_top", "store_merge",
    "innovation_scores",
]


def _bhte(xp, a):
    return xp.permute_dims(a, (0, 2, 1, 3))


def windowed_attention_state(q, window: int | None, fading: bool = False):
    """The empty state of ``windowed_attention`` for queries shaped like ``q`` [B, *, H, E]."""
    xp = namespace(q)
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    acc = acc_dtype(xp, q.dtype)
    raw = 0 if window is None else window
    z = xp.zeros((B, H, raw, E), dtype=acc, device=device(q))
    state = {"pos": 0, "k": z, "v": z}
    if fading:
        f = xp.zeros((B, H, 2 * window, E), dtype=acc, device=device(q))
        state.update(fk=f, fv=f)
    return state


def windowed_attention(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                       return_final_state=False):
    """One softmax (scale 1/sqrt(E)) over the raw window (t-W, t] of (k, v) and, if given,
    the fading window (t-2W, t-W] of (fading_k, fading_v). All [B, T, H, E], already rotated.
    """
    xp = namespace(q, k, v)
    check_attention_args(q, k, v, fading_k, fading_v, window, initial_state, streaming=False)
    fading = fading_k is not None
    state = initial_state or windowed_attention_state(q, window, fading)
    acc = acc_dtype(xp, q.dtype)

    def c(a):
        return _bhte(xp, xp.astype(a, acc))

    pos = state["pos"]
    src, rk, rv = raw_source(xp, c(k), c(v), state["k"], state["v"], pos, window)
    sources = [src]
    new = {"pos": pos + q.shape[1], "k": rk, "v": rv}
    if fading:
        src, new["fk"], new["fv"] = fading_source(xp, c(fading_k), c(fading_v), state["fk"],
                                                  state["fv"], pos, window)
        sources.append(src)
    o = cast_out(xp, _bhte(xp, readout(xp, c(q), sources)), q.dtype)
    return (o, new) if return_final_state else o


def windowed_attention_step(q_t, k_t, v_t, state, window=None, fading_k_t=None, fading_v_t=None):
    """Streaming form of ``windowed_attention``: [B, H, E] inputs -> (o_t [B, H, E], state)."""
    xp = namespace(q_t, k_t, v_t)
    check_attention_args(q_t, k_t, v_t, fading_k_t, fading_v_t, window, state,
                         streaming=True)
    acc = acc_dtype(xp, q_t.dtype)

    def c(a):
        return xp.astype(a, acc)

    pos = state["pos"]
    src, rk, rv = raw_source_step(xp, c(k_t), c(v_t), state["k"], state["v"], pos, window)
    sources = [src]
    new = {"pos": pos + 1, "k": rk, "v": rv}
    if fading_k_t is not None:
        src, new["fk"], new["fv"] = fading_source_step(xp, c(fading_k_t), c(fading_v_t),
                                                       state["fk"], state["fv"], pos, window)
        sources.append(src)
    o = readout(xp, c(q_t)[:, :, None], sources)[:, :, 0]
    return cast_out(xp, o, q_t.dtype), new


def associative_readout(k, v, capacity=None):
    """y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j, no scale; y_0 = 0.

    k, v: [B, T, H, E] (keys double as queries). The layer form, with a streaming state,
    is ``memcore.spec.mosaic``.
    """
    xp = namespace(k, v)
    if k.ndim != 4 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"associative_readout: k and v must be [B, T, H, E] of one shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    acc = acc_dtype(xp, k.dtype)
    kk = _bhte(xp, xp.astype(k, acc))
    T = k.shape[1]
    i = xp.arange(T, device=device(k))
    mask = i[None, :] <= i[:, None] - 1
    if capacity is not None:
        mask = mask & (i[None, :] >= i[:, None] - capacity)
    scores = xp.matmul(kk, xp.permute_dims(kk, (0, 1, 3, 2)))
    y = masked_softmax_readout(xp, scores, mask[None, None], _bhte(xp, xp.astype(v, acc)))
    return cast_out(xp, _bhte(xp, y), k.dtype)


def persistent_readout(k, mem_k, mem_v):
    """softmax(k . mem_k) mem_v per head: k [..., H, E]; mem_k, mem_v [H, P, E]."""
    xp = namespace(k, mem_k, mem_v)
    H, E = k.shape[-2], k.shape[-1]
    if mem_k.ndim != 3 or tuple(mem_k.shape[::2]) != (H, E) or tuple(mem_v.shape) != tuple(
            mem_k.shape):
        raise ValueError(f"persistent_readout: mem_k and mem_v must be [H={H}, P, E={E}], got "
                         f"{tuple(mem_k.shape)} and {tuple(mem_v.shape)}")
    acc = acc_dtype(xp, k.dtype)
    kk, mk, mv = (xp.astype(a, acc) for a in (k, mem_k, mem_v))
    scores = xp.sum(kk[..., :, None, :] * mk, axis=-1)
    m = xp.max(scores, axis=-1, keepdims=True)
    w = xp.exp(scores - m)
    w = w / xp.sum(w, axis=-1, keepdims=True)
    return cast_out(xp, xp.sum(w[..., :, :, None] * mv, axis=-2), k.dtype)


def store_top(entries: dict, n: int) -> dict:
    """The first n entries of an entry set (keys k, v [B, H, S, E], score, pos [B, S]) in the
    store's total order: filled first, higher score first, later position first on ties."""
    return _store.top(namespace(entries["k"]), entries, n)


def store_merge(a: dict, b: dict, n: int) -> dict:
    """The best n entries of the union of two entry sets (associative)."""
    return _store.merge(namespace(a["k"]), a, b, n)


def innovation_scores(x, s_prev, pred_weight):
    """r_t = mean((x_t - s_{t-1} pred_weight^T)^2): x, s_prev [B, T, D] -> [B, T]."""
    return _store.innovation_scores(namespace(x), x, s_prev, pred_weight)
