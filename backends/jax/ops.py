"""The primitives of ``memcore.spec.reference.ops`` on JAX arrays, in their fast forms
(associative scans, banded readouts, sorted store). Same names, signatures, layouts and state
dicts as the reference, so ``memcore.ops`` routes JAX arrays here and states interchange.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from memcore.spec.validate import check_attention_args, check_leaky_args, check_scan_args

from . import store as _store
from ._base import acc_dtype, combine
from .banded import banded_partial, dense_partial, refill_ring, ring_positions, unroll_ring
from .scan import as_acc, leaky_core, leaky_step_core, selective_scan_core, selective_step_core

# Each op runs as one compiled computation (cached per shape) rather than op by op.
_scan_jit = jax.jit(selective_scan_core, static_argnums=(8,))
_step_jit = jax.jit(selective_step_core, static_argnums=(9,))
_leaky_jit = jax.jit(leaky_core)
_leaky_step_jit = jax.jit(leaky_step_core)

__all__ = [
    "selective_scan", "selective_state_update", "leaky_average", "leaky_average_step",
    "windowed_attention", "windowed_attention_step", "windowed_attention_state",
    "associative_readout", "persistent_readout", "store_top", "store_merge",
    "innovation_scores",
]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False):
    """mamba-ssm's ``selective_scan_fn`` plus an initial state (see the reference)."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, streaming=False)
    Bt, Dc, _ = u.shape
    acc = acc_dtype(u.dtype)
    h0 = jnp.zeros((Bt, Dc, A.shape[1]), acc) if initial_state is None else initial_state
    args = as_acc(u.dtype, u, delta, A, B, C, D, z, delta_bias, h0)
    y, hT = _scan_jit(*args[:8], bool(delta_softplus), args[8])
    y = y.astype(u.dtype)
    return (y, hT) if return_final_state else y


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, state, streaming=True)
    h, *args = as_acc(u.dtype, state, u, delta, A, B, C, D, z, delta_bias)
    y, h = _step_jit(h, *args, bool(delta_softplus))
    return y.astype(u.dtype), h


def leaky_average(k, log_decay, initial_state=None, return_final_state=False):
    """kbar_t = k_t + exp(log_decay_h) kbar_{t-1}; k [B, T, H, E]."""
    check_leaky_args(k, log_decay, initial_state, streaming=False)
    B, _, H, E = k.shape
    h0 = jnp.zeros((B, H, E), acc_dtype(k.dtype)) if initial_state is None else initial_state
    kk, ld, h0 = as_acc(k.dtype, k, log_decay, h0)
    y, hT = _leaky_jit(kk, ld, h0)
    y = y.astype(k.dtype)
    return (y, hT) if return_final_state else y


def leaky_average_step(k_t, log_decay, state):
    check_leaky_args(k_t, log_decay, state, streaming=True)
    kk, ld, h = as_acc(k_t.dtype, k_t, log_decay, state)
    y, h = _leaky_step_jit(kk, ld, h)
    return y.astype(k_t.dtype), h


def windowed_attention_state(q, window: int | None, fading: bool = False):
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    acc = acc_dtype(q.dtype)
    z = jnp.zeros((B, H, 0 if window is None else window, E), acc)
    state = {"pos": 0, "k": z, "v": z}
    if fading:
        f = jnp.zeros((B, H, 2 * window, E), acc)
        state.update(fk=f, fv=f)
    return state


def _bhte(a, acc):
    return jnp.swapaxes(a.astype(acc), 1, 2)


def windowed_attention(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                       return_final_state=False):
    """One softmax (scale 1/sqrt(E)) over the raw window and, if given, the fading window;
    all inputs [B, T, H, E], already rotated. Banded when ``window`` is set."""
    check_attention_args(q, k, v, fading_k, fading_v, window, initial_state, streaming=False)
    fading = fading_k is not None
    state = initial_state or windowed_attention_state(q, window, fading)
    rings = {key: a for key, a in state.items() if key != "pos"}
    o, rings = _windowed(q, k, v, fading_k, fading_v, rings, jnp.asarray(state["pos"]), window)
    new = {"pos": state["pos"] + q.shape[1], **rings}
    return (o, new) if return_final_state else o


@functools.partial(jax.jit, static_argnums=(7,))
def _windowed(q, k, v, fading_k, fading_v, state, pos, window):
    acc = acc_dtype(q.dtype)
    B, T, H, E = q.shape
    scale = 1.0 / math.sqrt(E)
    qq, kk, vv = (_bhte(a, acc) for a in (q, k, v))
    new = {}
    if window is None:
        # The reference's cache holds every earlier token: its length is the position.
        kc = jnp.concatenate([state["k"].astype(acc), kk], axis=2)
        vc = jnp.concatenate([state["v"].astype(acc), vv], axis=2)
        start = state["k"].shape[2]
        mask = jnp.arange(start + T)[None, :] <= start + jnp.arange(T)[:, None]
        parts = [dense_partial(qq, kc, vc, mask[None, None], scale)]
        new.update(k=kc, v=vc)
    else:
        W = window
        kx = jnp.concatenate([unroll_ring(state["k"].astype(acc), pos, W), kk], axis=2)
        vx = jnp.concatenate([unroll_ring(state["v"].astype(acc), pos, W), vv], axis=2)
        valid = jnp.broadcast_to((pos - W + jnp.arange(W + T)) >= 0, (B, W + T))
        parts = [banded_partial(qq, kx, vx, valid, W, scale)]
        new.update(k=refill_ring(kx, pos - W, pos + T, W), v=refill_ring(vx, pos - W, pos + T, W))
    if fading_k is not None:
        W = window
        fk, fv = _bhte(fading_k, acc), _bhte(fading_v, acc)
        fkx = jnp.concatenate([unroll_ring(state["fk"].astype(acc), pos, 2 * W), fk], axis=2)
        fvx = jnp.concatenate([unroll_ring(state["fv"].astype(acc), pos, 2 * W), fv], axis=2)
        valid = jnp.broadcast_to((pos - 2 * W + jnp.arange(2 * W + T)) >= 0, (B, 2 * W + T))
        parts.append(banded_partial(qq, fkx, fvx, valid, W, scale))
        new.update(fk=refill_ring(fkx, pos - 2 * W, pos + T, 2 * W),
                   fv=refill_ring(fvx, pos - 2 * W, pos + T, 2 * W))
    return jnp.swapaxes(combine(parts), 1, 2).astype(q.dtype), new


def windowed_attention_step(q_t, k_t, v_t, state, window=None, fading_k_t=None, fading_v_t=None):
    """Streaming form: [B, H, E] inputs -> (o_t [B, H, E], state)."""
    check_attention_args(q_t, k_t, v_t, fading_k_t, fading_v_t, window, state,
                         streaming=True)
    rings = {key: a for key, a in state.items() if key != "pos"}
    o, rings = _windowed_step(q_t, k_t, v_t, fading_k_t, fading_v_t, rings,
                              jnp.asarray(state["pos"]), window)
    return o, {"pos": state["pos"] + 1, **rings}


@functools.partial(jax.jit, static_argnums=(7,))
def _windowed_step(q_t, k_t, v_t, fading_k_t, fading_v_t, state, pos, window):
    acc = acc_dtype(q_t.dtype)
    scale = 1.0 / math.sqrt(q_t.shape[-1])
    q, k, v = (a.astype(acc)[:, :, None] for a in (q_t, k_t, v_t))
    new = {}
    if window is None:
        rk = jnp.concatenate([state["k"].astype(acc), k], axis=2)
        rv = jnp.concatenate([state["v"].astype(acc), v], axis=2)
        mask = jnp.ones((rk.shape[2],), bool)
    else:
        write = (jnp.arange(window) == jnp.remainder(pos, window))[None, None, :, None]
        rk = jnp.where(write, k, state["k"].astype(acc))
        rv = jnp.where(write, v, state["v"].astype(acc))
        mask = ring_positions(pos + 1, window) >= 0
    new.update(k=rk, v=rv)
    parts = [dense_partial(q, rk, rv, mask[None, None, None], scale)]
    if fading_k_t is not None:
        W = window
        write = (jnp.arange(2 * W) == jnp.remainder(pos, 2 * W))[None, None, :, None]
        fk = jnp.where(write, fading_k_t.astype(acc)[:, :, None], state["fk"].astype(acc))
        fv = jnp.where(write, fading_v_t.astype(acc)[:, :, None], state["fv"].astype(acc))
        fpos = ring_positions(pos + 1, 2 * W)
        fmask = (fpos >= 0) & (fpos <= pos - W)
        parts.append(dense_partial(q, fk, fv, fmask[None, None, None], scale))
        new.update(fk=fk, fv=fv)
    return combine(parts)[:, :, 0].astype(q_t.dtype), new


def associative_readout(k, v, capacity=None):
    """y_t = sum_{t-M <= j <= t-1} softmax_j(k_t . k_j) v_j, no scale; y_0 = 0.
    k, v: [B, T, H, E]. Banded when ``capacity`` is set."""
    if k.ndim != 4 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"associative_readout: k and v must be [B, T, H, E] of one shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    return _associative(k, v, capacity)


@functools.partial(jax.jit, static_argnums=(2,))
def _associative(k, v, capacity):
    acc = acc_dtype(k.dtype)
    B, T, H, E = k.shape
    kk, vv = _bhte(k, acc), _bhte(v, acc)
    if capacity is None:
        i = jnp.arange(T)
        part = dense_partial(kk, kk, vv, (i[None, :] <= i[:, None] - 1)[None, None], 1.0)
    else:
        # Entry j of the extended array is key j - (M + 1): query i reads i + 1 .. i + M.
        M = capacity
        pad = jnp.zeros((B, H, M + 1, E), acc)
        kx, vx = jnp.concatenate([pad, kk], axis=2), jnp.concatenate([pad, vv], axis=2)
        valid = jnp.broadcast_to(jnp.arange(M + 1 + T) >= M + 1, (B, M + 1 + T))
        part = banded_partial(kk, kx, vx, valid, M, 1.0)
    return jnp.swapaxes(combine([part]), 1, 2).astype(k.dtype)


def persistent_readout(k, mem_k, mem_v):
    """softmax(k . mem_k) mem_v per head: k [..., H, E]; mem_k, mem_v [H, P, E]."""
    H, E = k.shape[-2], k.shape[-1]
    if mem_k.ndim != 3 or tuple(mem_k.shape[::2]) != (H, E) or tuple(mem_v.shape) != tuple(
            mem_k.shape):
        raise ValueError(f"persistent_readout: mem_k and mem_v must be [H={H}, P, E={E}], got "
                         f"{tuple(mem_k.shape)} and {tuple(mem_v.shape)}")
    acc = acc_dtype(k.dtype)
    scores = jnp.einsum("...he,hpe->...hp", k.astype(acc), mem_k.astype(acc))
    w = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("...hp,hpe->...he", w, mem_v.astype(acc)).astype(k.dtype)


def _check_entries(name: str, e):
    if not isinstance(e, dict) or set(e) != set(_store.FIELDS):
        raise ValueError(f"{name} must be an entry set with keys {list(_store.FIELDS)}, got "
                         f"{sorted(e) if isinstance(e, dict) else type(e).__name__}")


def store_top(entries: dict, n: int) -> dict:
    """The first n entries (k, v [B, H, S, E], score, pos [B, S]) in the store's order."""
    _check_entries("entries", entries)
    out = _store.top({f: jnp.asarray(a) for f, a in entries.items()}, int(n))
    out["pos"] = out["pos"].astype(jnp.asarray(entries["pos"]).dtype)
    return out


def store_merge(a: dict, b: dict, n: int) -> dict:
    """The best n entries of the union of two entry sets (associative)."""
    _check_entries("a", a)
    _check_entries("b", b)
    return store_top(_store.concat({f: jnp.asarray(x) for f, x in a.items()},
                                   {f: jnp.asarray(x).astype(jnp.asarray(a[f]).dtype)
                                    for f, x in b.items()}), n)


def innovation_scores(x, s_prev, pred_weight):
    """r_t = mean((x_t - s_{t-1} pred_weight^T)^2): x, s_prev [B, T, D] -> [B, T]."""
    return _store.innovation_scores(x, s_prev, pred_weight)
