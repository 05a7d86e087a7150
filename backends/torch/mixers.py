"""The layers' computations on the accumulation dtype, both forms, in the reference's state
layout (see ``memcore.spec.reference.windowed``, ``mamba``, ``mosaic``).

Every function takes the spec, the parameters by name (already cast), the input, the state
arrays (no ``pos``/``spec_id``) and the position, and returns (y, new arrays[, aux]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch, store
from ._util import (
    NEG_INF,
    append_in_place,
    l2_normalize,
    linear,
    rope,
    rope_inv_freq,
    softplus,
    sub,
)
from .attention import (
    band_partial,
    band_sdpa,
    causal_full,
    combine,
    default_scale,
    partial,
    ring_slot_positions,
    ring_to_seq,
    ring_write,
    seq_to_ring,
)
from .scan import leaky_average, leaky_average_step, selective_scan, selective_state_update

# --- Mamba block -----------------------------------------------------------------------------


def _split_x_dbl(spec, x_dbl):
    R, N = spec.dt_rank_value, spec.d_state
    return x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:R + 2 * N]


def _causal_conv(xcat, weight, bias, T: int):
    """Depthwise causal convolution in time-first layout: xcat [B, K-1+T, Di] (the state's
    K-1 inputs, then this call's), weight [Di, 1, K] -> [B, T, Di], as conv1d computes it
    (out_t = bias + sum_j w_j xcat_{t+j}). K shifted multiply-adds over contiguous rows: no
    transposes around the convolution, and the output feeds x_proj and the scan as is."""
    w = weight[:, 0, :].t()  # [K, Di]
    y = torch.addcmul(bias, xcat[:, 0:T], w[0])
    for j in range(1, w.shape[0]):
        y = torch.addcmul(y, xcat[:, j:j + T], w[j])
    return y


def mamba_forward(spec, p, x, state):
    Di, K = spec.d_inner, spec.d_conv
    B, T, _ = x.shape
    xz = linear(x, p["in_proj.weight"])  # [B, T, 2 Di]
    z = xz[..., Di:].transpose(1, 2)  # [B, Di, T], a view
    xcat = torch.cat([state["conv"].transpose(1, 2), xz[..., :Di]], dim=1)  # [B, K-1+T, Di]
    xc = F.silu(_causal_conv(xcat, p["conv1d.weight"], p["conv1d.bias"], T))  # [B, T, Di]
    dt_low, Bm, Cm = _split_x_dbl(spec, linear(xc, p["x_proj.weight"]))
    delta = linear(dt_low, p["dt_proj.weight"]).transpose(1, 2)
    A = -torch.exp(p["A_log"])
    y, h = selective_scan(xc.transpose(1, 2), delta, A, Bm.transpose(1, 2),
                          Cm.transpose(1, 2), p["D"], z, delta_bias=p["dt_proj.bias"],
                          delta_softplus=True, initial_state=state["ssm"],
                          return_final_state=True)
    out = linear(y.transpose(1, 2), p["out_proj.weight"])
    conv = (xcat[:, xcat.shape[1] - (K - 1):].transpose(1, 2) if K > 1 else state["conv"])
    return out, {"conv": conv, "ssm": h}


def mamba_step(spec, p, x_t, state, inplace: bool = False):
    """One token; with ``inplace`` the convolution window and the SSM state are written
    into ``state``'s own tensors."""
    Di = spec.d_inner
    xz = linear(x_t, p["in_proj.weight"])
    xi, z = xz[:, :Di], xz[:, Di:]
    conv = state["conv"]
    window = torch.cat([conv, xi[:, :, None]], dim=-1)  # [B, Di, K]
    xc = F.silu((window * p["conv1d.weight"][:, 0, :]).sum(-1) + p["conv1d.bias"])
    dt_low, Bm, Cm = _split_x_dbl(spec, linear(xc, p["x_proj.weight"]))
    delta = linear(dt_low, p["dt_proj.weight"])
    A = -torch.exp(p["A_log"])
    if not inplace:
        y, h = selective_state_update(state["ssm"], xc, delta, A, Bm, Cm, p["D"], z,
                                      delta_bias=p["dt_proj.bias"], delta_softplus=True)
        return linear(y, p["out_proj.weight"]), {"conv": window[:, :, 1:], "ssm": h}
    conv.copy_(window[:, :, 1:])
    y = _selective_update_(state["ssm"], xc, delta, A, Bm, Cm, p["D"], z, p["dt_proj.bias"])
    return linear(y, p["out_proj.weight"]), {"conv": conv, "ssm": state["ssm"]}


def _selective_update_(h, u, delta, A, B, C, D, z, delta_bias):
    """``selective_state_update`` (softplus on, ungrouped B/C) with the new state written
    into ``h`` [B, Dc, N]; everything already in the accumulation dtype. Returns y [B, Dc]."""
    dt = softplus(delta + delta_bias[None, :])
    h.mul_(torch.exp(dt[:, :, None] * A[None]))
    h.addcmul_((dt * u)[:, :, None], B[:, None, :])
    y = torch.matmul(h, C[:, :, None])[:, :, 0] + D[None, :] * u
    return y * F.silu(z)


# --- windowed readout: transformer, bmojo_f, bmojo ---------------------------------------------

def _heads_bhte(spec, x, weight, pos, rotate):
    B, T, _ = x.shape
    y = linear(x, weight).reshape(B, T, spec.n_heads, spec.head_dim)
    if rotate and spec.positions == "rope":
        y = rope(y, pos)
    return y.transpose(1, 2)


def _fading_weights(spec, p):
    if spec.tie_fading:
        return p["k_proj.weight"], p["v_proj.weight"]
    return p["k_fading_proj.weight"], p["v_fading_proj.weight"]


def _merge_heads(spec, p, o):
    B, H, T, E = o.shape
    return linear(o.transpose(1, 2).reshape(B, T, H * E), p["o_proj.weight"])


def _store_spec(spec):
    return getattr(spec, "store", None)


def windowed_forward(spec, p, x, state, pos: int):
    B, T, _ = x.shape
    W = spec.window
    fading = bool(getattr(spec, "fading", False))
    st = _store_spec(spec)
    scale = default_scale(spec.head_dim)
    q = _heads_bhte(spec, x, p["q_proj.weight"], pos, True)
    k = _heads_bhte(spec, x, p["k_proj.weight"], pos, True)
    v = _heads_bhte(spec, x, p["v_proj.weight"], pos, False)
    new = {}
    if W is None:  # full causal attention (no fading or store without a window)
        o, new["k"], new["v"] = causal_full(q, state["k"], state["v"], k, v, pos)
        return _merge_heads(spec, p, o), new, None

    rk = torch.cat([ring_to_seq(state["k"], pos), k], dim=2)  # positions pos-W ..
    rv = torch.cat([ring_to_seq(state["v"], pos), v], dim=2)
    sources = [(rk, rv, pos - W, 0, W)]
    kernel = T > 0 and dispatch.use_kernels(x)
    new["k"] = seq_to_ring(rk[:, :, -W:], pos + T)
    new["v"] = seq_to_ring(rv[:, :, -W:], pos + T)
    s = None
    if fading:
        s, mstate = mamba_forward(spec.fading_block, sub(p, "fading."), x,
                                  {"conv": state["conv"], "ssm": state["ssm"]})
        new.update(mstate)
        wk, wv = _fading_weights(spec, p)
        fk = _heads_bhte(spec, s, wk, pos, True)
        fv = _heads_bhte(spec, s, wv, pos, False)
        ek = torch.cat([ring_to_seq(state["fk"], pos), fk], dim=2)  # positions pos-2W ..
        ev = torch.cat([ring_to_seq(state["fv"], pos), fv], dim=2)
        sources.append((ek, ev, pos - 2 * W, W, 2 * W))
        new["fk"] = seq_to_ring(ek[:, :, -2 * W:], pos + T)
        new["fv"] = seq_to_ring(ev[:, :, -2 * W:], pos + T)
    aux = snap = None
    parts = [] if kernel else [band_partial(q, pos, sources, scale)]
    if st is not None:
        part, aux, st_state, snap = _store_forward(spec, st, p, x, s, q, k, v, state, pos,
                                                   scale, not kernel)
        if part is not None:
            parts.append(part)
        new.update(st_state)
    if kernel:
        o = dispatch.windowed_readout(q, pos, W, sources[0][:2],
                                      sources[1][:2] if fading else None, snap,
                                      st.chunk if snap is not None else None)
        return _merge_heads(spec, p, o), new, aux
    return _merge_heads(spec, p, combine(parts)), new, aux


def _entries(state, prefix):
    return {f: state[prefix + f] for f in store.FIELDS}


def _store_forward(spec, st, p, x, s, q, k, v, state, pos, scale, want_part=True):
    """(store partial or None, aux, new store state, snapshots or None); the partial is
    left to the kernel when ``want_part`` is false."""
    B, T, _ = x.shape
    W, C = spec.window, st.chunk
    if s is not None:
        s_prev = torch.cat([state["s_last"][:, None, :], s[:, :T - 1]], dim=1)
        scores = store.innovation_scores(x, s_prev, p["pred_proj.weight"])
    else:
        scores = store.innovation_scores(x, None, None)
    qpos = torch.arange(pos, pos + T, device=x.device)
    toks = {"k": k, "v": v, "score": scores, "pos": qpos[None, :].expand(B, T)}
    snap, c0, front, cand, kept = store.parallel(
        toks, _entries(state, "cand_"), _entries(state, "store_"), pos, C, st.select,
        st.capacity)
    new = {"s_last": s[:, T - 1] if s is not None else state["s_last"]}
    new.update({"cand_" + f: a for f, a in cand.items()})
    new.update({"store_" + f: a for f, a in kept.items()})
    part = None
    if st.capacity and not want_part:
        return part, scores.mean(), new, snap
    if st.capacity:
        n_chunks = snap["k"].shape[2]
        qc = store.to_chunks(q, front, n_chunks, C, 2)  # [B, H, nC, C, E]
        sc = (qc @ snap["k"].transpose(-1, -2)) * scale  # [B, H, nC, C, M]
        tq = (c0 * C + torch.arange(n_chunks * C, device=x.device)).reshape(n_chunks, C)
        sp = snap["pos"][:, None, :, None, :]  # [B, 1, nC, 1, M]
        mask = (sp >= 0) & (sp <= tq[None, None, :, :, None] - W)
        m, l, acc = partial(sc, mask, snap["v"])
        H, E = q.shape[1], q.shape[3]
        n = n_chunks * C
        part = (m.reshape(B, H, n, 1)[:, :, front:front + T],
                l.reshape(B, H, n, 1)[:, :, front:front + T],
                acc.reshape(B, H, n, E)[:, :, front:front + T])
    return part, scores.mean(), new, None


def windowed_step(spec, p, x_t, state, pos: int, inplace: bool = False):
    """One token. The readout sees the store as it was before this token; the store is
    updated after it. With ``inplace`` every array (rings, Mamba state, ``s_last``, the
    candidates and the store) is written into ``state``'s own tensors."""
    B, _ = x_t.shape
    W = spec.window
    fading = bool(getattr(spec, "fading", False))
    st = _store_spec(spec)
    x = x_t[:, None, :]
    tables = (_step_rope(pos, spec.head_dim, x_t.dtype, x_t.device)
              if spec.positions == "rope" and spec.head_dim > 1 else None)
    q = _step_heads(spec, x_t, p["q_proj.weight"], tables)  # [B, H, 1, E]
    k = _step_heads(spec, x_t, p["k_proj.weight"], tables)
    v = _step_heads(spec, x_t, p["v_proj.weight"], None)
    dev = x_t.device
    new = {}
    keys, vals, masks = [], [], []
    if W is None:  # the KV cache grows by design (amortised when in place)
        if inplace:
            new["k"] = append_in_place(state["k"], k[:, :, 0])
            new["v"] = append_in_place(state["v"], v[:, :, 0])
        else:
            new["k"] = torch.cat([state["k"], k], dim=2)
            new["v"] = torch.cat([state["v"], v], dim=2)
        masks.append(None)
    else:
        new["k"] = ring_write(state["k"], k[:, :, 0], pos, inplace)
        new["v"] = ring_write(state["v"], v[:, :, 0], pos, inplace)
        masks.append(None if pos + 1 >= W else
                     (ring_slot_positions(pos + 1, W, dev) >= 0)[None, None, None, :])
    keys.append(new["k"])
    vals.append(new["v"])
    s_t = None
    if fading:
        s_t, mstate = mamba_step(spec.fading_block, sub(p, "fading."), x_t,
                                 {"conv": state["conv"], "ssm": state["ssm"]}, inplace)
        new.update(mstate)
        wk, wv = _fading_weights(spec, p)
        fk = _step_heads(spec, s_t, wk, tables)
        fv = _step_heads(spec, s_t, wv, None)
        new["fk"] = ring_write(state["fk"], fk[:, :, 0], pos, inplace)
        new["fv"] = ring_write(state["fv"], fv[:, :, 0], pos, inplace)
        sp = ring_slot_positions(pos + 1, 2 * W, dev)
        keys.append(new["fk"])
        vals.append(new["fv"])
        masks.append(((sp >= 0) & (sp <= pos - W))[None, None, None, :])
    aux = score = None
    if st is not None:
        kept = _entries(state, "store_")
        keys.append(kept["k"])
        vals.append(kept["v"])
        masks.append(((kept["pos"] >= 0) & (kept["pos"] <= pos - W))[:, None, None, :])
        pred = p["pred_proj.weight"] if fading else None
        score = store.innovation_scores(x, state["s_last"][:, None, :] if fading else None,
                                        pred)  # [B, 1]
        aux = score.mean()
    o = _step_readout(spec, q, keys, vals, masks)
    if st is not None:  # after the readout, which sees the store before this token
        tok = {"k": k, "v": v, "score": score,
               "pos": torch.full((B, 1), pos, dtype=torch.int64, device=dev)}
        new.update(_store_step(spec, st, state, tok, s_t, pos, inplace))
    return _merge_heads(spec, p, o)[:, 0], new, aux


_INV_FREQ = {}


def _step_rope(pos: int, E: int, dtype, device):
    """``rope_tables(pos, 1, E, ...)``, with the frequencies made once per width, dtype and
    device (the angle is the same product; a position below 2^24 is exact in float32)."""
    key = (E, dtype, device)
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        inv_freq = _INV_FREQ[key] = rope_inv_freq(E, dtype, device)
    ang = (inv_freq * float(pos))[None, None, None, :]
    return torch.cos(ang), torch.sin(ang)


def _step_heads(spec, x_t, weight, tables):
    """One token's projection as heads [B, H, 1, E], rotated with ``tables`` if given."""
    y = linear(x_t, weight).reshape(x_t.shape[0], 1, spec.n_heads, spec.head_dim)
    if tables is not None:
        y = rope(y, 0, tables)
    return y.transpose(1, 2)


def _step_readout(spec, q, keys, vals, masks):
    """One softmax over the sources' keys for the query q [B, H, 1, E] (a mask of None: every
    key of that source is visible). Scores are joined, values are read source by source:
    the keys and values are never copied into one buffer."""
    B, H = q.shape[:2]
    sc = torch.cat([q @ kk.transpose(-1, -2) for kk in keys], dim=-1)
    sc = sc * default_scale(spec.head_dim)
    if any(m is not None for m in masks):
        ones = torch.ones((), dtype=torch.bool, device=q.device)
        mask = torch.cat([(ones if m is None else m).expand(B, H, 1, kk.shape[2])
                          for m, kk in zip(masks, keys, strict=True)], dim=-1)
        sc = sc.masked_fill(~mask, NEG_INF)
    m = sc.amax(-1, keepdim=True).detach()  # finite: the newest raw key is always visible
    w = torch.exp(sc - m)
    acc, start = None, 0
    for vv in vals:
        n = vv.shape[2]
        part = w[..., start:start + n] @ vv
        acc = part if acc is None else acc + part
        start += n
    return acc / w.sum(-1, keepdim=True)


def _store_step(spec, st, state, tok, s_t, pos, inplace):
    """The token joins the chunk's candidates; at a chunk's end the candidates merge into the
    store and the candidate slots empty. Returns the new store arrays (``state``'s own
    tensors, updated, with ``inplace``)."""
    cand, kept = _entries(state, "cand_"), _entries(state, "store_")
    s_last = state["s_last"]
    chunk_end = (pos + 1) % st.chunk == 0
    if inplace:
        store.merge_into(cand, tok)
        if chunk_end:
            store.merge_into(kept, cand)
            store.clear(cand)
        if s_t is not None:
            s_last.copy_(s_t)
    else:  # a new state shares no tensor with the given one (either may be stepped in place)
        cand = store.merge(cand, tok, st.select)
        if chunk_end:
            kept = store.merge(kept, cand, st.capacity)
            cand = store.empty(tok["k"].shape[0], spec.n_heads, st.select, spec.head_dim,
                               tok["k"].dtype, tok["k"].device)
        else:
            kept = {f: a.clone() for f, a in kept.items()}
        s_last = s_last.clone() if s_t is None else s_t
    new = {"s_last": s_last}
    new.update({"cand_" + f: a for f, a in cand.items()})
    new.update({"store_" + f: a for f, a in kept.items()})
    return new


# --- Memory Mosaics ----------------------------------------------------------------------------

def _key_scale(q):
    return torch.exp(torch.clamp(10.0 * q, max=5.0))


def _value(p, u_next, u_now):
    c = p["v_mix"][:, None]
    return torch.exp(10.0 * p["v_scale"])[:, None] * l2_normalize((1.0 - c) * u_next + c * u_now)


def _split_heads(spec, y):
    return y.reshape(*y.shape[:-1], spec.n_heads, spec.head_dim)


def mosaic_forward(spec, p, x, state, pos: int):
    B, T, D = x.shape
    M = spec.capacity
    kbar, kbar_T = leaky_average(_split_heads(spec, linear(x, p["k_proj.weight"])),
                                 -10.0 * p["leak"].abs(), initial_state=state["kbar"],
                                 return_final_state=True)
    k = _key_scale(p["k_scale"])[:, None] * l2_normalize(kbar)  # [B, T, H, E]
    u = _split_heads(spec, linear(x, p["v_proj.weight"]))
    # Pairs completed by this call: j = pos-1 .. pos+T-2 (j = -1 does not exist).
    k_pairs = torch.cat([state["k_last"][:, None], k[:, :T - 1]], dim=1)
    u_prev = torch.cat([state["u_last"][:, None], u[:, :T - 1]], dim=1)
    kp = k_pairs.transpose(1, 2)  # [B, H, T, E]
    vp = _value(p, u, u_prev).transpose(1, 2)
    if pos == 0:
        kp, vp = kp[:, :, 1:], vp[:, :, 1:]
    q = k.transpose(1, 2)  # keys are the queries
    kernel = T > 0 and (M is not None or pos == 0) and dispatch.use_kernels(x)
    if M is None:
        mem_k = torch.cat([state["mem_k"], kp], dim=2)  # pairs 0 .. pos+T-2
        mem_v = torch.cat([state["mem_v"], vp], dim=2)
        if kernel:  # a first call: the pairs are the call's own
            y = dispatch.mosaic_readout(k, mem_k, mem_v, None).transpose(1, 2)
        elif pos == 0:  # strictly causal: query t reads pairs j <= t-1; t = 0 reads nothing
            y = torch.zeros_like(q)
            if T > 1:
                rest = F.scaled_dot_product_attention(q[:, :, 1:], mem_k, mem_v,
                                                      is_causal=True, scale=1.0)
                y = torch.cat([y[:, :, :1], rest], dim=2)
        else:
            qp = torch.arange(pos, pos + T, device=x.device)
            mask = torch.arange(mem_k.shape[2], device=x.device)[None, :] <= qp[:, None] - 1
            y = F.scaled_dot_product_attention(q, mem_k, mem_v, attn_mask=mask, scale=1.0)
        new_k, new_v = mem_k, mem_v
    else:
        n_old, n_new = max(pos - 1, 0), max(pos + T - 1, 0)
        ek = torch.cat([ring_to_seq(state["mem_k"], n_old), kp], dim=2)  # from n_old - M
        ev = torch.cat([ring_to_seq(state["mem_v"], n_old), vp], dim=2)
        if kernel:  # ring slots before position 0 are empty: leave them out
            live = M - min(n_old, M)
            y = dispatch.mosaic_readout(k, ek[:, :, live:], ev[:, :, live:], M).transpose(1, 2)
        else:
            y = band_sdpa(q, pos, (ek, ev, n_old - M, 1, M + 1), 1.0)
        new_k = seq_to_ring(ek[:, :, -M:], n_new)
        new_v = seq_to_ring(ev[:, :, -M:], n_new)
    y = y.transpose(1, 2).reshape(B, T, D)
    new = {"kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1], "mem_k": new_k,
           "mem_v": new_v}
    return linear(y, p["o_proj.weight"]), new


def _leaky_step(p, k_t, kbar, inplace: bool):
    """kbar_t = k_t + exp(-10 |leak|) kbar_{t-1}: (kbar_t, new state); with ``inplace`` the
    state tensor ``kbar`` itself is updated and is both."""
    log_decay = -10.0 * p["leak"].abs()
    if not inplace:
        return leaky_average_step(k_t, log_decay, kbar)
    kbar.mul_(torch.exp(log_decay)[None, :, None]).add_(k_t)
    return kbar, kbar


def mosaic_step(spec, p, x_t, state, pos: int, inplace: bool = False):
    """One token. With ``inplace`` the leaky average, the last key/value and (with a
    capacity) the memory ring are written into ``state``'s own tensors; without a capacity
    the memory grows by one pair, by design."""
    B, D = x_t.shape
    kbar, kbar_state = _leaky_step(p, _split_heads(spec, linear(x_t, p["k_proj.weight"])),
                                   state["kbar"], inplace)
    k = _key_scale(p["k_scale"])[:, None] * l2_normalize(kbar)  # [B, H, E]
    u = _split_heads(spec, linear(x_t, p["v_proj.weight"]))
    mem_k, mem_v = state["mem_k"], state["mem_v"]
    if pos >= 1:  # the pair (k_{pos-1}, v_{pos-1}) completes now
        v_prev = _value(p, u, state["u_last"])
        if spec.capacity is None and inplace:  # grows by design, amortised in place
            mem_k = append_in_place(mem_k, state["k_last"])
            mem_v = append_in_place(mem_v, v_prev)
        elif spec.capacity is None:
            mem_k = torch.cat([mem_k, state["k_last"][:, :, None]], dim=2)
            mem_v = torch.cat([mem_v, v_prev[:, :, None]], dim=2)
        else:
            mem_k = ring_write(mem_k, state["k_last"], pos - 1, inplace)
            mem_v = ring_write(mem_v, v_prev, pos - 1, inplace)
    elif not inplace:  # a new state shares no tensor with the given one
        mem_k, mem_v = mem_k.clone(), mem_v.clone()
    S = mem_k.shape[2]
    sc = k[:, :, None, :] @ mem_k.transpose(-1, -2)  # [B, H, 1, S]
    if spec.capacity is None or pos >= spec.capacity:
        valid = torch.ones((), dtype=torch.bool, device=x_t.device)
    else:
        valid = ring_slot_positions(pos, spec.capacity, x_t.device) >= 0
    y = combine([partial(sc, valid.expand(B, spec.n_heads, 1, S), mem_v)])[:, :, 0]
    if inplace:  # the previous pair is in the ring: k_last and u_last are free to overwrite
        k_last, u_last = state["k_last"].copy_(k), state["u_last"].copy_(u)
    else:
        k_last, u_last = k, u
    new = {"kbar": kbar_state, "k_last": k_last, "u_last": u_last, "mem_k": mem_k,
           "mem_v": mem_v}
    return linear(y.reshape(B, D), p["o_proj.weight"]), new


def _persistent_read(p, kbar):
    alpha = _key_scale(p["k_scale"])[:, None]
    key = alpha * alpha * l2_normalize(kbar)  # [..., H, E]
    w = torch.softmax(torch.einsum("...he,hpe->...hp", key, p["mem_k"]), dim=-1)
    y = torch.einsum("...hp,hpe->...he", w, p["mem_v"])
    return y * torch.exp(10.0 * p["out_scale"])[:, None]


def persistent_forward(spec, p, x, state, pos: int):
    B, T, D = x.shape
    kbar, kbar_T = leaky_average(_split_heads(spec, linear(x, p["k_proj.weight"])),
                                 -10.0 * p["leak"].abs(), initial_state=state["kbar"],
                                 return_final_state=True)
    y = _persistent_read(p, kbar).reshape(B, T, D)
    return linear(y, p["o_proj.weight"]), {"kbar": kbar_T}


def persistent_step(spec, p, x_t, state, pos: int, inplace: bool = False):
    kbar, kbar_state = _leaky_step(p, _split_heads(spec, linear(x_t, p["k_proj.weight"])),
                                   state["kbar"], inplace)
    y = _persistent_read(p, kbar).reshape(x_t.shape)
    return linear(y, p["o_proj.weight"]), {"kbar": kbar_state}
