"""Memory Mosaics' contextual memory (DESIGN 2.5): leaky-average keys, one-step look-ahead
values, the associative readout over the pairs held in memory. State: ``kbar``, ``k_last``,
``u_last``, ``mem_k``/``mem_v`` (a ring with a capacity, else a growing cache), plus ``pos``."""

from __future__ import annotations

import torch

from ..associative_readout import memory_readout
from ..leaky_average import leaky_average, leaky_average_step
from ..numerics import combine, l2_normalize, linear, partial
from ..packed import cu_tensor
from ..rings import append_in_place, ring_positions, ring_to_seq, ring_write, seq_to_ring


def init_state(spec, batch: int, *, dtype=torch.float32, device=None) -> dict:
    H, E = spec.n_heads, spec.head_dim
    slots = 0 if spec.capacity is None else spec.capacity

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device)

    return {"pos": 0, "kbar": zeros(batch, H, E), "k_last": zeros(batch, H, E),
            "u_last": zeros(batch, H, E), "mem_k": zeros(batch, H, slots, E),
            "mem_v": zeros(batch, H, slots, E)}


def key_scale(q):
    return torch.exp(torch.clamp(10.0 * q, max=5.0))


def split_heads(spec, y):
    return y.reshape(*y.shape[:-1], spec.n_heads, spec.head_dim)


def leaky_keys(spec, p, x, kbar, bounds=None):
    """The leaky average of x's key projection, parallel form: (kbar [B, T, H, E], final);
    restarting at every document of ``bounds`` (a packed row's checked cu_seqlens)."""
    return leaky_average(split_heads(spec, linear(x, p["k_proj.weight"])),
                         -10.0 * p["leak"].abs(), initial_state=kbar if bounds is None else None,
                         return_final_state=True, cu_seqlens=cu_tensor(bounds))


def leaky_key_step(spec, p, x_t, kbar, inplace: bool):
    """One token of ``leaky_keys``: (kbar_t, new state); with ``inplace`` both are ``kbar``."""
    return leaky_average_step(split_heads(spec, linear(x_t, p["k_proj.weight"])),
                              -10.0 * p["leak"].abs(), kbar, inplace=inplace)


def _value(p, u_next, u_now):
    c = p["v_mix"][:, None]
    return torch.exp(10.0 * p["v_scale"])[:, None] * l2_normalize((1.0 - c) * u_next + c * u_now)


def forward(spec, p, x, state, bounds=None):
    """x [B, T, D] in the accumulation dtype -> (y, state, None). ``bounds``: a packed row's
    checked cu_seqlens (``packed.mosaic_forward``)."""
    if bounds is not None:
        from .packed import mosaic_forward

        return mosaic_forward(spec, p, x, state, bounds)
    B, T, D = x.shape
    M, pos = spec.readout.capacity, state["pos"]
    kbar, kbar_T = leaky_keys(spec, p, x, state["kbar"])
    k = key_scale(p["k_scale"])[:, None] * l2_normalize(kbar)  # [B, T, H, E]
    u = split_heads(spec, linear(x, p["v_proj.weight"]))
    # Pairs completed by this call: j = pos-1 .. pos+T-2 (j = -1 does not exist).
    k_pairs = torch.cat([state["k_last"][:, None], k[:, :T - 1]], dim=1)
    u_prev = torch.cat([state["u_last"][:, None], u[:, :T - 1]], dim=1)
    kp = k_pairs.transpose(1, 2)  # [B, H, T, E]
    vp = _value(p, u, u_prev).transpose(1, 2)
    if pos == 0:
        kp, vp = kp[:, :, 1:], vp[:, :, 1:]
    if M is None:
        mem_k = torch.cat([state["mem_k"], kp], dim=2)  # pairs 0 .. pos+T-2
        mem_v = torch.cat([state["mem_v"], vp], dim=2)
        y = memory_readout(k, mem_k, mem_v, pos, None)
        new_k, new_v = mem_k, mem_v
    else:
        n_old, n_new = max(pos - 1, 0), max(pos + T - 1, 0)
        ek = torch.cat([ring_to_seq(state["mem_k"], n_old), kp], dim=2)  # from n_old - M
        ev = torch.cat([ring_to_seq(state["mem_v"], n_old), vp], dim=2)
        y = memory_readout(k, ek, ev, pos, M)
        new_k = seq_to_ring(ek[:, :, -M:], n_new)
        new_v = seq_to_ring(ev[:, :, -M:], n_new)
    y = y.transpose(1, 2).reshape(B, T, D)
    new = {"pos": pos + T, "kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1],
           "mem_k": new_k, "mem_v": new_v}
    return linear(y, p["o_proj.weight"]), new, None


def step(spec, p, x_t, state, *, inplace: bool = False):
    """One token. With ``inplace`` the leaky average, the last key/value and (with a
    capacity) the memory ring are written into ``state``'s own tensors; without a capacity
    the memory grows by one pair, by design."""
    B, D = x_t.shape
    M, pos = spec.readout.capacity, state["pos"]
    kbar, kbar_state = leaky_key_step(spec, p, x_t, state["kbar"], inplace)
    k = key_scale(p["k_scale"])[:, None] * l2_normalize(kbar)  # [B, H, E]
    u = split_heads(spec, linear(x_t, p["v_proj.weight"]))
    mem_k, mem_v = state["mem_k"], state["mem_v"]
    if pos >= 1:  # the pair (k_{pos-1}, v_{pos-1}) completes now
        v_prev = _value(p, u, state["u_last"])
        if M is None and inplace:  # grows by design, amortised in place
            mem_k = append_in_place(mem_k, state["k_last"])
            mem_v = append_in_place(mem_v, v_prev)
        elif M is None:
            mem_k = torch.cat([mem_k, state["k_last"][:, :, None]], dim=2)
            mem_v = torch.cat([mem_v, v_prev[:, :, None]], dim=2)
        else:
            mem_k = ring_write(mem_k, state["k_last"], pos - 1, inplace)
            mem_v = ring_write(mem_v, v_prev, pos - 1, inplace)
    elif not inplace:  # a new state shares no tensor with the given one
        mem_k, mem_v = mem_k.clone(), mem_v.clone()
    S = mem_k.shape[2]
    sc = k[:, :, None, :] @ mem_k.transpose(-1, -2)  # [B, H, 1, S]
    if M is None or pos >= M:
        valid = torch.ones((), dtype=torch.bool, device=x_t.device)
    else:
        valid = ring_positions(pos, M, x_t.device) >= 0
    # the slots left out are the ring's empty ones, zeros: read as they are
    y = combine([partial(sc, valid.expand(B, spec.n_heads, 1, S), mem_v, masked_zero=True)])
    y = y[:, :, 0]
    if inplace:  # the previous pair is in the ring: k_last and u_last are free to overwrite
        k_last, u_last = state["k_last"].copy_(k), state["u_last"].copy_(u)
    else:
        k_last, u_last = k, u
    new = {"pos": pos + 1, "kbar": kbar_state, "k_last": k_last, "u_last": u_last,
           "mem_k": mem_k, "mem_v": mem_v}
    return linear(y.reshape(B, D), p["o_proj.weight"]), new, None
