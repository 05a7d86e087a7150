"""Memory Mosaics' contextual memory layer (DESIGN 2.5), both forms.

Per head h (no query projection, no positional encoding, no 1/sqrt(E)):
    k_t = exp(min(10 q_h, 5)) Norm(leaky_average(x Wphi)_t),  decay exp(-10 |p_h|)
    v_t = exp(10 r_h) Norm((1 - c_h) x_{t+1} Wpsi + c_h x_t Wpsi)
    y_t = sum_{j <= t-1} softmax_j(k_t . k_j) v_j            (y = 0 where no j is allowed)
The pair (k_j, v_j) is complete once x_{j+1} is known, so the state keeps the pending key
and x_j Wpsi of the last position. With ``capacity`` M, the memory keeps the last M pairs.

Parameters: k_proj.weight, v_proj.weight, o_proj.weight [D, D]; leak (p), k_scale (q),
v_scale (r), v_mix (c): [H].
"""

from __future__ import annotations

from ..associative_readout import memory_extend, memory_positions, memory_write, read_memory
from ..leaky_average import leaky_average, leaky_average_step
from ..numerics import device, l2_normalize, linear, namespace
from ..packed import packed_array, same_document
from ..rings import seq_positions


def heads(xp, x, H):
    """[..., H * E] -> [..., H, E]."""
    return xp.reshape(x, tuple(x.shape[:-1]) + (H, x.shape[-1] // H))


def key_scale(xp, q):
    """alpha = exp(min(10 q_h, 5)), per head."""
    return xp.exp(xp.minimum(10.0 * q, xp.asarray(5.0, dtype=q.dtype, device=device(q))))


def leaky_keys(xp, spec, p, x, kbar0, bounds=None):
    """Parallel leaky average of x Wphi per head, from the state ``kbar0`` (restarting at
    every document of ``bounds``, a packed row's cu_seqlens): (kbar, final)."""
    return leaky_average(heads(xp, linear(xp, x, p["k_proj.weight"]), spec.leaky.n_heads),
                         -10.0 * xp.abs(p["leak"]),
                         initial_state=kbar0 if bounds is None else None,
                         return_final_state=True, cu_seqlens=packed_array(bounds))


def leaky_keys_step(xp, spec, p, x_t, kbar):
    return leaky_average_step(heads(xp, linear(xp, x_t, p["k_proj.weight"]), spec.leaky.n_heads),
                              -10.0 * xp.abs(p["leak"]), kbar)


def _value(xp, p, u_next, u_now):
    """v from x_{t+1} Wpsi and x_t Wpsi, [..., H, E] each."""
    c = p["v_mix"][:, None]
    mix = (1.0 - c) * u_next + c * u_now
    return xp.exp(10.0 * p["v_scale"])[:, None] * l2_normalize(xp, mix)


def _keys(xp, p, kbar):
    return key_scale(xp, p["k_scale"])[:, None] * l2_normalize(xp, kbar)


def init_state(spec, batch: int, like):
    """The state before any token, in ``like``'s namespace, dtype and device."""
    xp, dev, ro = namespace(like), device(like), spec.readout
    z = xp.zeros((batch, spec.leaky.n_heads, spec.leaky.head_dim), dtype=like.dtype, device=dev)
    slots = 0 if ro.capacity is None else ro.capacity
    mem = xp.zeros((batch, ro.n_heads, slots, ro.head_dim), dtype=like.dtype, device=dev)
    return {"pos": 0, "kbar": z, "k_last": z, "u_last": z, "mem_k": mem, "mem_v": mem}


def forward(spec, params, x, state, bounds=None):
    """x: [B, T, D] at absolute positions pos .. pos+T-1 -> (y [B, T, D], state, None).
    ``bounds``: a packed row's checked cu_seqlens (from the empty state): a query reads only
    pairs of its own document; the state is the last document's."""
    xp, p, cap = namespace(x), params, spec.readout.capacity
    B, T, _ = x.shape
    pos = state["pos"]
    kbar, kbar_T = leaky_keys(xp, spec, p, x, state["kbar"], bounds)
    k = _keys(xp, p, kbar)  # [B, T, H, E]
    u = heads(xp, linear(xp, x, p["v_proj.weight"]), spec.readout.n_heads)
    # Pairs completed by this call: j = pos-1 .. pos+T-2 (j = -1 does not exist).
    k_pairs = xp.concat([state["k_last"][:, None], k[:, :T - 1]], axis=1)
    u_prev = xp.concat([state["u_last"][:, None], u[:, :T - 1]], axis=1)
    v_pairs = _value(xp, p, u, u_prev)
    kp = xp.permute_dims(k_pairs, (0, 2, 1, 3))  # [B, H, T, E]
    vp = xp.permute_dims(v_pairs, (0, 2, 1, 3))
    mem_k, mem_v, mpos, new_k, new_v = memory_extend(xp, cap, state["mem_k"], state["mem_v"],
                                                     kp, vp, pos)
    q = xp.permute_dims(k, (0, 2, 1, 3))  # keys are the queries
    same = None
    if bounds is not None:  # columns: the empty state's slots, then pairs j = -1 .. T - 2
        held = state["mem_k"].shape[2]
        same = xp.concat([xp.zeros((T, held + 1), dtype=xp.bool, device=device(x)),
                          same_document(xp, bounds, x)[:, :T - 1]], axis=1)
    y = read_memory(xp, q, mem_k, mem_v, mpos, seq_positions(xp, pos, T, x), cap, same)
    y = xp.reshape(xp.permute_dims(y, (0, 2, 1, 3)), (B, T, spec.d_model))
    if bounds is not None:  # the last document's memory, from its own pairs only
        last = bounds[-2]
        *_, new_k, new_v = memory_extend(xp, cap, state["mem_k"], state["mem_v"],
                                         kp[:, :, last:], vp[:, :, last:], 0)
    n = T if bounds is None else T - bounds[-2]
    new_state = {"pos": pos + n, "kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1],
                 "mem_k": new_k, "mem_v": new_v}
    return linear(xp, y, p["o_proj.weight"]), new_state, None


def step(spec, params, x_t, state):
    """x_t: [B, D] at absolute position pos -> (y_t [B, D], state, None)."""
    xp, p, cap = namespace(x_t), params, spec.readout.capacity
    B = x_t.shape[0]
    pos = state["pos"]
    kbar, kbar_state = leaky_keys_step(xp, spec, p, x_t, state["kbar"])
    k = _keys(xp, p, kbar)  # [B, H, E]
    u = heads(xp, linear(xp, x_t, p["v_proj.weight"]), spec.readout.n_heads)
    mem_k, mem_v = state["mem_k"], state["mem_v"]
    if pos >= 1:  # the pair (k_{pos-1}, v_{pos-1}) completes now
        v_prev = _value(xp, p, u, state["u_last"])
        mem_k, mem_v = memory_write(xp, cap, mem_k, mem_v, state["k_last"], v_prev, pos - 1)
    mpos = memory_positions(xp, cap, pos, x_t)
    y = read_memory(xp, k[:, :, None, :], mem_k, mem_v, mpos, seq_positions(xp, pos, 1, x_t),
                    cap)[:, :, 0]
    y = xp.reshape(y, (B, spec.d_model))
    new_state = {"pos": pos + 1, "kbar": kbar_state, "k_last": k, "u_last": u, "mem_k": mem_k,
                 "mem_v": mem_v}
    return linear(xp, y, p["o_proj.weight"]), new_state, None
