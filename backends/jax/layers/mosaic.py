"""Memory Mosaics' contextual memory unit (DESIGN 2.5): leaky-average keys, one-step-ahead
values, associative readout.

State: ``kbar``, ``k_last``, ``u_last`` [B, H, E]; ``mem_k``, ``mem_v`` [B, H, S, E] (the
readout's memory: a ring of ``capacity`` pairs, or a growing cache of ``max_len`` slots); ``pos``.
The readout has no Pallas kernel, so ``implementation`` changes nothing here.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..associative_readout import readout, readout_step
from ..leaky_average import leaky_average, leaky_average_step
from ..numerics import POS_DTYPE, heads, l2_normalize, linear


def init_state(spec, batch: int, dtype, max_len: int = 0) -> dict:
    r = spec.readout
    H, E = r.n_heads, r.head_dim
    z = jnp.zeros((batch, H, E), dtype)
    slots = max_len if r.capacity is None else r.capacity
    mem = jnp.zeros((batch, H, slots, E), dtype)
    return {"kbar": z, "k_last": z, "u_last": z, "mem_k": mem, "mem_v": mem,
            "pos": jnp.zeros((), POS_DTYPE)}


def key_scale(q):
    return jnp.exp(jnp.minimum(10.0 * q, 5.0))


def _value(p, u_next, u_now):
    c = p["v_mix"][:, None]
    return jnp.exp(10.0 * p["v_scale"])[:, None] * l2_normalize((1.0 - c) * u_next + c * u_now)


def _keys(p, kbar):
    return key_scale(p["k_scale"])[:, None] * l2_normalize(kbar)


def _decay(p):
    return -10.0 * jnp.abs(p["leak"])


def forward(spec, p, x, st, *, implementation="auto", cu_seqlens=None):
    """x: [B, T, D] at positions pos .. pos + T - 1 -> (y [B, T, D], state, None).
    ``cu_seqlens``: a packed row's checked boundaries (``packed.mosaic_forward``)."""
    if cu_seqlens is not None:
        from .packed import mosaic_forward

        return mosaic_forward(spec, p, x, st, cu_seqlens)
    H, pos = spec.readout.n_heads, st["pos"]
    B, T, _ = x.shape
    kbar, kbar_T = leaky_average(heads(linear(x, p["k_proj.weight"]), H), _decay(p), st["kbar"],
                                 return_final_state=True)
    k = _keys(p, kbar)  # [B, T, H, E]
    u = heads(linear(x, p["v_proj.weight"]), H)
    # Pairs completed by this call have positions pos - 1 .. pos + T - 2.
    k_pairs = jnp.concatenate([st["k_last"][:, None], k[:, :T - 1]], axis=1)
    u_prev = jnp.concatenate([st["u_last"][:, None], u[:, :T - 1]], axis=1)
    o, mem_k, mem_v = readout(jnp.swapaxes(k, 1, 2), jnp.swapaxes(k_pairs, 1, 2),
                              jnp.swapaxes(_value(p, u, u_prev), 1, 2), st["mem_k"],
                              st["mem_v"], pos, spec.readout.capacity)
    y = jnp.swapaxes(o, 1, 2).reshape(B, T, spec.d_model)
    new = {"kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1], "mem_k": mem_k,
           "mem_v": mem_v, "pos": pos + T}
    return linear(y, p["o_proj.weight"]), new, None


def step(spec, p, x_t, st):
    """x_t: [B, D] at position pos -> (y_t [B, D], state, None)."""
    H, pos = spec.readout.n_heads, st["pos"]
    kbar, kbar_state = leaky_average_step(heads(linear(x_t, p["k_proj.weight"]), H), _decay(p),
                                          st["kbar"])
    k = _keys(p, kbar)  # [B, H, E]
    u = heads(linear(x_t, p["v_proj.weight"]), H)
    # The pair (k_{pos-1}, v_{pos-1}) completes now.
    o, mem_k, mem_v = readout_step(k, st["k_last"], _value(p, u, st["u_last"]), st["mem_k"],
                                   st["mem_v"], pos, spec.readout.capacity)
    new = {"kbar": kbar_state, "k_last": k, "u_last": u, "mem_k": mem_k, "mem_v": mem_v,
           "pos": pos + 1}
    return linear(o.reshape(x_t.shape[0], spec.d_model), p["o_proj.weight"]), new, None
