"""The packed forms (DESIGN 5a) of the windowed and mosaic layers: a row of batch 1 holding
documents at the boundaries ``cu`` (int32 [N + 1], possibly traced), each run as if alone from
the empty state. Shapes depend on T and N only, so one trace serves every packing.

Positions (rotary angles, windows, chunks) count from each document's first token; every
source of a softmax is masked to the query's document (segment ids, selected with ``where`` so
a non-finite value stays in its document); the recurrent parts restart through their
primitives' ``cu_seqlens``. The state returned is the last document's, gathered from its
tokens (its start is traced). The store's chunk scan restarts at every document
(``eidetic_store.packed_parallel``). ``implementation`` reaches the fading block's scan and the
windowed readout; a readout with a store source runs on JAX (the kernel takes no store in a
packed row).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .. import eidetic_store as store
from ..associative_readout import packed_readout as associative_packed
from ..leaky_average import leaky_average
from ..numerics import heads, linear
from ..packed import doc_positions, last_start, segment_ids, to_slots
from ..rings import seq_to_ring
from ..windowed_readout import packed_readout
from . import mamba, sub


def windowed_forward(spec, p, x, st, cu, implementation="auto"):
    """Packed form of ``windowed.forward``: x [1, T, D] -> (y, last document's state, aux)."""
    from .windowed import _fading_weights, _mamba_state, _out, _qkv, _scores, _shared

    T = x.shape[1]
    r = spec.readout
    W, sts = r.window, r.store
    scale = 1.0 / math.sqrt(r.head_dim)
    seg, dpos = segment_ids(cu, T), doc_positions(cu, T)
    ls = last_start(cu)
    n = T - ls
    q, k, v = _qkv(spec, p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"], x, dpos)
    new = {"pos": st["pos"] + n}
    if W is None:
        slots = st["k"].shape[2]
        new["k"], new["v"] = to_slots(k, ls, n, slots), to_slots(v, ls, n, slots)
    else:
        new["k"], new["v"] = seq_to_ring(k, -ls, n, W), seq_to_ring(v, -ls, n, W)
    s = fading = None
    if r.fading:
        s, mst, _ = mamba.forward(spec.fading_block, sub(p, "fading."), x, _mamba_state(st),
                                  cu_seqlens=cu, implementation=implementation)
        new.update(conv=mst["conv"], ssm=mst["ssm"])
        _, fk, fv = _qkv(spec, None, *_fading_weights(spec, p), s, dpos)
        fading = (fk, fv)
        new["fk"], new["fv"] = seq_to_ring(fk, -ls, n, 2 * W), seq_to_ring(fv, -ls, n, 2 * W)
    aux, extra = None, []
    if sts is not None:
        s_prev = None
        if s is not None:  # a document's first prediction is from s = 0
            s_prev = jnp.concatenate([jnp.zeros_like(s[:, :1]), s[:, :T - 1]], axis=1)
            s_prev = jnp.where((dpos == 0)[None, :, None], jnp.zeros((), s.dtype), s_prev)
        scores = _scores(x, s_prev, p)
        aux = jnp.mean(scores)
        snap, lay, cand, kept = store.packed_parallel(k, v, scores, dpos, cu, sts.chunk,
                                                      sts.select, sts.capacity)
        if sts.capacity > 0:
            extra.append(store.packed_visible_partial(q, snap, lay, dpos, W, scale))
        new["s_last"] = s[:, T - 1] if s is not None else st["s_last"]
        new.update({"cand_" + f: a for f, a in cand.items()})
        new.update({"store_" + f: a for f, a in kept.items()})
    # a store source is a softmax partial of its own, which the kernel cannot join: JAX then
    o = packed_readout(q, (_shared(spec, k), _shared(spec, v)), fading, W, seg, extra, cu=cu,
                       implementation="jax" if extra else implementation)
    return _out(p, o), new, aux


def mosaic_forward(spec, p, x, st, cu):
    """Packed form of ``mosaic.forward``: a query reads the pairs of its own document only;
    x [1, T, D] -> (y, last document's state, None)."""
    from .mosaic import _decay, _keys, _value

    B, T, D = x.shape
    H, M = spec.readout.n_heads, spec.readout.capacity
    ls = last_start(cu)
    n = T - ls
    kbar, kbar_T = leaky_average(heads(linear(x, p["k_proj.weight"]), H), _decay(p), None,
                                 return_final_state=True, cu_seqlens=cu)
    k = _keys(p, kbar)  # [B, T, H, E]
    u = heads(linear(x, p["v_proj.weight"]), H)
    # Pair j = 0 .. T - 1: key k_j, value from x_{j+1} and x_j (a document's last pair mixes
    # in the next document's first token, and no query of either document reads it; pair
    # T - 1 has no next token and is never read).
    u_next = jnp.concatenate([u[:, 1:], jnp.zeros_like(u[:, :1])], axis=1)
    kp = jnp.swapaxes(k, 1, 2)
    vp = jnp.swapaxes(_value(p, u_next, u), 1, 2)
    o = associative_packed(kp, kp, vp, segment_ids(cu, T), M)
    y = jnp.swapaxes(o, 1, 2).reshape(B, T, D)
    # The last document's n - 1 pairs, from doc position 0 (global ls).
    if M is None:
        slots = st["mem_k"].shape[2]
        mem_k, mem_v = to_slots(kp, ls, n - 1, slots), to_slots(vp, ls, n - 1, slots)
    else:
        mem_k, mem_v = seq_to_ring(kp, -ls, n - 1, M), seq_to_ring(vp, -ls, n - 1, M)
    new = {"kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1], "mem_k": mem_k,
           "mem_v": mem_v, "pos": st["pos"] + n}
    return linear(y, p["o_proj.weight"]), new, None
