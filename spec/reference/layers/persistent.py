"""Memory Mosaics' persistent memory layer (DESIGN 2.6), which replaces the FFN; both forms.

    k_t = exp(min(10 q_h, 5))^2 Norm(leaky_average(x W)_t)
    y_t = softmax(k_t Mk^T) Mv * exp(10 r_h)

Parameters: k_proj.weight, o_proj.weight [D, D]; leak, k_scale, out_scale [H]; mem_k, mem_v
[H, P, E]. State: the leaky average ``kbar`` [B, H, E].
"""

from __future__ import annotations

from ..numerics import device, l2_normalize, linear, namespace
from ..persistent_readout import read_slots
from .mosaic import key_scale, leaky_keys, leaky_keys_step


def init_state(spec, batch: int, like):
    """The state before any token, in ``like``'s namespace, dtype and device."""
    lk = spec.leaky
    return {"pos": 0, "kbar": namespace(like).zeros((batch, lk.n_heads, lk.head_dim),
                                                     dtype=like.dtype, device=device(like))}


def _read(xp, p, kbar):
    """kbar: [..., H, E] leaky averages -> [..., H, E] readout from the learned slots."""
    alpha = key_scale(xp, p["k_scale"])[:, None]
    y = read_slots(xp, alpha * alpha * l2_normalize(xp, kbar), p["mem_k"], p["mem_v"])
    return y * xp.exp(10.0 * p["out_scale"])[:, None]


def forward(spec, params, x, state, bounds=None):
    """x: [B, T, D] -> (y [B, T, D], state, None). ``bounds``: a packed row's checked
    cu_seqlens (from the empty state): the leaky average restarts at every document."""
    xp, p, ro = namespace(x), params, spec.readout
    B, T, _ = x.shape
    kbar, kbar_T = leaky_keys(xp, spec, p, x, state["kbar"], bounds)
    y = xp.reshape(_read(xp, p, kbar), (B, T, ro.n_heads * ro.head_dim))
    n = T if bounds is None else T - bounds[-2]
    return linear(xp, y, p["o_proj.weight"]), {"pos": state["pos"] + n, "kbar": kbar_T}, None


def step(spec, params, x_t, state):
    """x_t: [B, D] -> (y_t [B, D], state, None)."""
    xp, p, ro = namespace(x_t), params, spec.readout
    kbar, kbar_state = leaky_keys_step(xp, spec, p, x_t, state["kbar"])
    y = xp.reshape(_read(xp, p, kbar), (x_t.shape[0], ro.n_heads * ro.head_dim))
    return linear(xp, y, p["o_proj.weight"]), {"pos": state["pos"] + 1, "kbar": kbar_state}, None
