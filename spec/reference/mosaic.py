"""Memory Mosaics units: associative readout (DESIGN 2.5) and persistent readout (2.6).

Contextual unit, per head h (no query projection, no positional encoding, no 1/sqrt(E)):
    k_t = exp(min(10 q_h, 5)) Norm(leaky_average(x Wphi)_t),  decay exp(-10 |p_h|)
    v_t = exp(10 r_h) Norm((1 - c_h) x_{t+1} Wpsi + c_h x_t Wpsi)
    y_t = sum_{j <= t-1} softmax_j(k_t . k_j) v_j            (y = 0 where no j is allowed)
The pair (k_j, v_j) is complete once x_{j+1} is known, so the state keeps the pending key
and x_j Wpsi of the last position. With ``capacity`` M, the memory keeps the last M pairs.

Parameters: k_proj.weight, v_proj.weight, o_proj.weight [D, D]; leak (p), k_scale (q),
v_scale (r), v_mix (c): [H]. Persistent: k_proj.weight, o_proj.weight [D, D]; leak, k_scale,
out_scale [H]; mem_k, mem_v [H, P, E].
"""

from __future__ import annotations

from ._xp import device, l2_normalize, linear, masked_softmax_readout
from .attention import ring_positions, ring_push, ring_refill
from .scan import leaky_average, leaky_average_step


def _heads(xp, x, H):
    return xp.reshape(x, tuple(x.shape[:-1]) + (H, x.shape[-1] // H))


def _key_scale(xp, q):
    return xp.exp(xp.minimum(10.0 * q, xp.asarray(5.0, dtype=q.dtype, device=device(q))))


def _value(xp, p, u_next, u_now):
    """v from x_{t+1} Wpsi and x_t Wpsi, [..., H, E] each."""
    c = p["v_mix"][:, None]
    mix = (1.0 - c) * u_next + c * u_now
    return xp.exp(10.0 * p["v_scale"])[:, None] * l2_normalize(xp, mix)


def _keys(xp, p, kbar):
    return _key_scale(xp, p["k_scale"])[:, None] * l2_normalize(xp, kbar)


# --- associative readout (contextual memory) -----------------------------------------------

def init_state(xp, spec, batch: int, dtype, like):
    H, E = spec.n_heads, spec.head_dim
    dev = device(like)
    z = xp.zeros((batch, H, E), dtype=dtype, device=dev)
    slots = 0 if spec.capacity is None else spec.capacity
    mem = xp.zeros((batch, H, slots, E), dtype=dtype, device=dev)
    return {"kbar": z, "k_last": z, "u_last": z, "mem_k": mem, "mem_v": mem}


def _mem_positions(xp, spec, n_pairs: int, like):
    """Positions of the pairs held in memory after ``n_pairs`` completed pairs."""
    if spec.capacity is None:
        return xp.arange(n_pairs, dtype=xp.int64, device=device(like))
    return ring_positions(xp, n_pairs, spec.capacity, like)


def forward(xp, spec, p, x, state, pos: int):
    """x: [B, T, D] at absolute positions pos .. pos+T-1 -> (y [B, T, D], state)."""
    H = spec.n_heads
    B, T, _ = x.shape
    kbar, kbar_T = leaky_average(_heads(xp, linear(xp, x, p["k_proj.weight"]), H),
                                 -10.0 * xp.abs(p["leak"]), initial_state=state["kbar"],
                                 return_final_state=True)
    k = _keys(xp, p, kbar)  # [B, T, H, E]
    u = _heads(xp, linear(xp, x, p["v_proj.weight"]), H)
    # Pairs completed by this call: j = pos-1 .. pos+T-2 (j = -1 does not exist).
    k_pairs = xp.concat([state["k_last"][:, None], k[:, :T - 1]], axis=1)
    u_prev = xp.concat([state["u_last"][:, None], u[:, :T - 1]], axis=1)
    v_pairs = _value(xp, p, u, u_prev)
    n_old = max(pos - 1, 0)
    old_pos = _mem_positions(xp, spec, n_old, x)
    new_pos = xp.arange(pos - 1, pos + T - 1, dtype=xp.int64, device=device(x))
    kp = xp.permute_dims(k_pairs, (0, 2, 1, 3))  # [B, H, T, E]
    vp = xp.permute_dims(v_pairs, (0, 2, 1, 3))
    mem_k = xp.concat([state["mem_k"], kp], axis=2)
    mem_v = xp.concat([state["mem_v"], vp], axis=2)
    mpos = xp.concat([old_pos, new_pos])
    qpos = xp.arange(pos, pos + T, dtype=xp.int64, device=device(x))
    mask = (mpos[None, :] <= qpos[:, None] - 1) & (mpos[None, :] >= 0)
    if spec.capacity is not None:
        mask = mask & (mpos[None, :] >= qpos[:, None] - spec.capacity)
    q = xp.permute_dims(k, (0, 2, 1, 3))  # keys are the queries
    scores = xp.matmul(q, xp.permute_dims(mem_k, (0, 1, 3, 2)))
    y = masked_softmax_readout(xp, scores, mask[None, None], mem_v)  # [B, H, T, E]
    y = xp.reshape(xp.permute_dims(y, (0, 2, 1, 3)), (B, T, spec.d_model))
    if spec.capacity is None:
        drop = 1 if pos == 0 else 0  # the pair j = -1 does not exist
        new_mem_k = xp.concat([state["mem_k"], kp[:, :, drop:]], axis=2)
        new_mem_v = xp.concat([state["mem_v"], vp[:, :, drop:]], axis=2)
    else:
        n_new = max(pos + T - 1, 0)
        new_mem_k = ring_refill(xp, mem_k, mpos, n_new, spec.capacity)
        new_mem_v = ring_refill(xp, mem_v, mpos, n_new, spec.capacity)
    new_state = {"kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1],
                 "mem_k": new_mem_k, "mem_v": new_mem_v}
    return linear(xp, y, p["o_proj.weight"]), new_state


def step(xp, spec, p, x_t, state, pos: int):
    """x_t: [B, D] at absolute position pos -> (y_t [B, D], state)."""
    H = spec.n_heads
    B = x_t.shape[0]
    kbar, kbar_state = leaky_average_step(_heads(xp, linear(xp, x_t, p["k_proj.weight"]), H),
                                          -10.0 * xp.abs(p["leak"]), state["kbar"])
    k = _keys(xp, p, kbar)  # [B, H, E]
    u = _heads(xp, linear(xp, x_t, p["v_proj.weight"]), H)
    mem_k, mem_v = state["mem_k"], state["mem_v"]
    if pos >= 1:  # the pair (k_{pos-1}, v_{pos-1}) completes now
        v_prev = _value(xp, p, u, state["u_last"])
        if spec.capacity is None:
            mem_k = xp.concat([mem_k, state["k_last"][:, :, None]], axis=2)
            mem_v = xp.concat([mem_v, v_prev[:, :, None]], axis=2)
        else:
            mem_k = ring_push(xp, mem_k, state["k_last"], pos - 1)
            mem_v = ring_push(xp, mem_v, v_prev, pos - 1)
    valid = _mem_positions(xp, spec, pos, x_t) >= 0
    scores = xp.matmul(k[:, :, None, :], xp.permute_dims(mem_k, (0, 1, 3, 2)))  # [B,H,1,S]
    y = masked_softmax_readout(xp, scores, valid[None, None, None, :], mem_v)[:, :, 0]
    y = xp.reshape(y, (B, spec.d_model))
    new_state = {"kbar": kbar_state, "k_last": k, "u_last": u, "mem_k": mem_k, "mem_v": mem_v}
    return linear(xp, y, p["o_proj.weight"]), new_state


# --- persistent readout ------------------------------------------------------------------

def persistent_init_state(xp, spec, batch: int, dtype, like):
    return {"kbar": xp.zeros((batch, spec.n_heads, spec.head_dim), dtype=dtype,
                             device=device(like))}


def _persistent_read(xp, p, k):
    """k: [..., H, E] keys -> [..., H, E] readout from the learned slots."""
    alpha = _key_scale(xp, p["k_scale"])[:, None]
    key = alpha * alpha * l2_normalize(xp, k)
    # [..., H, E] x [H, E, P] -> [..., H, P]
    scores = xp.sum(key[..., :, None, :] * p["mem_k"], axis=-1)
    m = xp.max(scores, axis=-1, keepdims=True)
    w = xp.exp(scores - m)
    w = w / xp.sum(w, axis=-1, keepdims=True)
    y = xp.sum(w[..., :, :, None] * p["mem_v"], axis=-2)
    return y * xp.exp(10.0 * p["out_scale"])[:, None]


def persistent_forward(xp, spec, p, x, state):
    H = spec.n_heads
    B, T, _ = x.shape
    kbar, kbar_T = leaky_average(_heads(xp, linear(xp, x, p["k_proj.weight"]), H),
                                 -10.0 * xp.abs(p["leak"]), initial_state=state["kbar"],
                                 return_final_state=True)
    y = xp.reshape(_persistent_read(xp, p, kbar), (B, T, spec.d_model))
    return linear(xp, y, p["o_proj.weight"]), {"kbar": kbar_T}


def persistent_step(xp, spec, p, x_t, state):
    H = spec.n_heads
    kbar, kbar_state = leaky_average_step(_heads(xp, linear(xp, x_t, p["k_proj.weight"]), H),
                                          -10.0 * xp.abs(p["leak"]), state["kbar"])
    y = xp.reshape(_persistent_read(xp, p, kbar), (x_t.shape[0], spec.d_model))
    return linear(xp, y, p["o_proj.weight"]), {"kbar": kbar_state}
