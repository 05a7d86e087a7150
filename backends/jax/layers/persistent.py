"""Memory Mosaics' persistent memory unit (DESIGN 2.6), the FFN of a mosaic block: leaky-average
keys read learned key/value slots. State: ``kbar`` [B, H, E] and ``pos``. No Pallas kernel."""

from __future__ import annotations

import jax.numpy as jnp

from ..leaky_average import leaky_average, leaky_average_step
from ..numerics import POS_DTYPE, heads, l2_normalize, linear
from ..packed import last_start
from ..persistent_readout import persistent_readout
from .mosaic import key_scale


def init_state(spec, batch: int, dtype, max_len: int = 0) -> dict:
    r = spec.readout
    return {"kbar": jnp.zeros((batch, r.n_heads, r.head_dim), dtype),
            "pos": jnp.zeros((), POS_DTYPE)}


def _read(p, kbar):
    alpha = key_scale(p["k_scale"])[:, None]
    key = alpha * alpha * l2_normalize(kbar)
    y = persistent_readout(key, p["mem_k"], p["mem_v"])
    return y * jnp.exp(10.0 * p["out_scale"])[:, None]


def forward(spec, p, x, st, *, implementation="auto", cu_seqlens=None):
    """x: [B, T, D] -> (y, state, None). ``cu_seqlens``: a packed row's checked boundaries
    (from the empty state): the leaky average restarts at every document."""
    B, T, _ = x.shape
    cu = cu_seqlens
    kbar, kbar_T = leaky_average(heads(linear(x, p["k_proj.weight"]), spec.readout.n_heads),
                                 -10.0 * jnp.abs(p["leak"]), st["kbar"] if cu is None else None,
                                 return_final_state=True, cu_seqlens=cu)
    y = _read(p, kbar).reshape(B, T, spec.d_model)
    n = T if cu is None else T - last_start(cu)
    return linear(y, p["o_proj.weight"]), {"kbar": kbar_T, "pos": st["pos"] + n}, None


def step(spec, p, x_t, st):
    kbar, kbar_state = leaky_average_step(heads(linear(x_t, p["k_proj.weight"]),
                                                spec.readout.n_heads),
                                          -10.0 * jnp.abs(p["leak"]), st["kbar"])
    y = _read(p, kbar).reshape(x_t.shape[0], spec.d_model)
    return linear(y, p["o_proj.weight"]), {"kbar": kbar_state, "pos": st["pos"] + 1}, None
