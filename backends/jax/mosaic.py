"""Memory Mosaics units: associative readout (DESIGN 2.5) and persistent readout (2.6).

State arrays: ``kbar``, ``k_last``, ``u_last`` [B, H, E]; ``mem_k``, ``mem_v`` [B, H, S, E]:
with a capacity M a ring of the last M pairs (pair j in slot j % M); without, a cache of
``max_len`` slots, pair j in slot j (the first max(pos - 1, 0) slots are filled).
"""

from __future__ import annotations

import jax.numpy as jnp

from ._base import combine, l2_normalize, linear, softmax_readout
from .banded import banded_partial, dense_partial, refill_ring, ring_positions, unroll_ring
from .scan import leaky_core, leaky_step_core


def init_arrays(spec, batch: int, dtype, max_len: int) -> dict:
    H, E = spec.n_heads, spec.head_dim
    z = jnp.zeros((batch, H, E), dtype)
    slots = max_len if spec.capacity is None else spec.capacity
    mem = jnp.zeros((batch, H, slots, E), dtype)
    return {"kbar": z, "k_last": z, "u_last": z, "mem_k": mem, "mem_v": mem}


def _heads(x, H):
    return x.reshape(x.shape[:-1] + (H, x.shape[-1] // H))


def _key_scale(q):
    return jnp.exp(jnp.minimum(10.0 * q, 5.0))


def _value(p, u_next, u_now):
    c = p["v_mix"][:, None]
    return jnp.exp(10.0 * p["v_scale"])[:, None] * l2_normalize((1.0 - c) * u_next + c * u_now)


def _keys(p, kbar):
    return _key_scale(p["k_scale"])[:, None] * l2_normalize(kbar)


def forward(spec, p, x, st, pos):
    """x: [B, T, D] at positions pos .. pos + T - 1 -> (y [B, T, D], arrays)."""
    H, M = spec.n_heads, spec.capacity
    B, T, _ = x.shape
    kbar, kbar_T = leaky_core(_heads(linear(x, p["k_proj.weight"]), H), -10.0 * jnp.abs(p["leak"]),
                              st["kbar"])
    k = _keys(p, kbar)  # [B, T, H, E]
    u = _heads(linear(x, p["v_proj.weight"]), H)
    # Pairs completed by this call have positions pos - 1 .. pos + T - 2.
    k_pairs = jnp.concatenate([st["k_last"][:, None], k[:, :T - 1]], axis=1)
    u_prev = jnp.concatenate([st["u_last"][:, None], u[:, :T - 1]], axis=1)
    kp = jnp.swapaxes(k_pairs, 1, 2)  # [B, H, T, E]
    vp = jnp.swapaxes(_value(p, u, u_prev), 1, 2)
    q = jnp.swapaxes(k, 1, 2)  # keys are the queries
    if M is None:
        L = st["mem_k"].shape[2]
        slot = pos - 1 + jnp.arange(T)
        slot = jnp.where(slot < 0, L, slot)  # the pair at position -1 does not exist: dropped
        mem_k = st["mem_k"].at[:, :, slot].set(kp, mode="drop")
        mem_v = st["mem_v"].at[:, :, slot].set(vp, mode="drop")
        qpos = pos + jnp.arange(T)
        mask = jnp.arange(L)[None, :] <= qpos[:, None] - 1
        part = dense_partial(q, mem_k, mem_v, mask[None, None], 1.0)
    else:
        start = pos - 1 - M  # ext entry j holds pair position start + j
        kx = jnp.concatenate([unroll_ring(st["mem_k"], pos - 1, M), kp], axis=2)
        vx = jnp.concatenate([unroll_ring(st["mem_v"], pos - 1, M), vp], axis=2)
        valid = (start + jnp.arange(M + T)) >= 0
        part = banded_partial(q, kx, vx, jnp.broadcast_to(valid, (B, M + T)), M, 1.0)
        n_new = jnp.maximum(pos + T - 1, 0)
        mem_k = refill_ring(kx, start, n_new, M)
        mem_v = refill_ring(vx, start, n_new, M)
    y = jnp.swapaxes(combine([part]), 1, 2).reshape(B, T, spec.d_model)
    new = {"kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1], "mem_k": mem_k,
           "mem_v": mem_v}
    return linear(y, p["o_proj.weight"]), new


def step(spec, p, x_t, st, pos):
    """x_t: [B, D] at position pos -> (y_t [B, D], arrays)."""
    H, M = spec.n_heads, spec.capacity
    B = x_t.shape[0]
    kbar, kbar_state = leaky_step_core(_heads(linear(x_t, p["k_proj.weight"]), H),
                                       -10.0 * jnp.abs(p["leak"]), st["kbar"])
    k = _keys(p, kbar)  # [B, H, E]
    u = _heads(linear(x_t, p["v_proj.weight"]), H)
    v_prev = _value(p, u, st["u_last"])
    S = st["mem_k"].shape[2]
    # The pair (k_{pos-1}, v_{pos-1}) completes now; at pos 0 there is none.
    slot = pos - 1 if M is None else jnp.remainder(pos - 1, M)
    write = (jnp.arange(S) == slot) & (pos >= 1)
    mem_k = jnp.where(write[None, None, :, None], st["k_last"][:, :, None], st["mem_k"])
    mem_v = jnp.where(write[None, None, :, None], v_prev[:, :, None], st["mem_v"])
    if M is None:
        valid = jnp.arange(S) < pos
    else:
        valid = ring_positions(pos, M) >= 0
    scores = jnp.einsum("bhe,bhse->bhs", k, mem_k)[:, :, None]
    y = softmax_readout(scores, valid[None, None, None], mem_v)[:, :, 0].reshape(B, spec.d_model)
    new = {"kbar": kbar_state, "k_last": k, "u_last": u, "mem_k": mem_k, "mem_v": mem_v}
    return linear(y, p["o_proj.weight"]), new


# --- persistent readout ------------------------------------------------------------------

def persistent_init_arrays(spec, batch: int, dtype) -> dict:
    return {"kbar": jnp.zeros((batch, spec.n_heads, spec.head_dim), dtype)}


def persistent_read(p, kbar):
    alpha = _key_scale(p["k_scale"])[:, None]
    key = alpha * alpha * l2_normalize(kbar)
    scores = jnp.einsum("...he,hpe->...hp", key, p["mem_k"])
    w = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("...hp,hpe->...he", w, p["mem_v"]) * jnp.exp(10.0 * p["out_scale"])[:, None]


def persistent_forward(spec, p, x, st):
    B, T, _ = x.shape
    kbar, kbar_T = leaky_core(_heads(linear(x, p["k_proj.weight"]), spec.n_heads),
                              -10.0 * jnp.abs(p["leak"]), st["kbar"])
    y = persistent_read(p, kbar).reshape(B, T, spec.d_model)
    return linear(y, p["o_proj.weight"]), {"kbar": kbar_T}


def persistent_step(spec, p, x_t, st):
    kbar, kbar_state = leaky_step_core(_heads(linear(x_t, p["k_proj.weight"]), spec.n_heads),
                                       -10.0 * jnp.abs(p["leak"]), st["kbar"])
    y = persistent_read(p, kbar).reshape(x_t.shape[0], spec.d_model)
    return linear(y, p["o_proj.weight"]), {"kbar": kbar_state}
