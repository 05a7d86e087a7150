"""The packed forms (DESIGN 5a) of the windowed and mosaic layers: a row of batch 1 holding
documents at the checked boundaries ``bounds``, each run as if alone from the empty state.

Positions (rotary angles, windows, chunks) count from each document's first token; every
source of a softmax is masked to the query's document (segment ids, selected with ``where``
so a non-finite value stays in its document); the recurrent parts restart through their
primitives' ``cu_seqlens``. The state returned is the last document's, built from its
tokens alone. The store selection runs per document (its chunk scan restarts at each).
"""

from __future__ import annotations

import torch
from memcore.spec.constants import ROPE_BASE

from .. import eidetic_store
from ..associative_readout import associative_readout
from ..banded import band_partial
from ..eidetic_store import store_partial
from ..implementation import choose
from ..numerics import combine, default_scale, l2_normalize, linear
from ..packed import cu_tensor, doc_positions, longest, segment_ids
from ..params import sub
from ..rings import seq_to_ring
from ..rotary import rope, rope_tables
from ..windowed_readout import packed_readout
from . import mamba
from .mosaic import _value, key_scale, leaky_keys, split_heads
from .windowed import _fading_state, _fading_weights, _merge_heads, _shared


def _tables(spec, x, dpos):
    """Rotary tables at the positions within documents ``dpos`` [T], or None (no rope)."""
    if spec.positions != "rope" or spec.head_dim < 2:
        return None
    cos, sin = rope_tables(0, int(dpos.max()) + 1, spec.head_dim, x.dtype, x.device,
                           getattr(spec, "rope_theta", ROPE_BASE))
    return cos[:, dpos], sin[:, dpos]


def _heads(spec, x, weight, tables):
    """x [B, T, D] -> [B, heads, T, E], rotated with ``tables`` when given."""
    B, T, _ = x.shape
    y = linear(x, weight).reshape(B, T, weight.shape[0] // spec.head_dim, spec.head_dim)
    return (y if tables is None else rope(y, 0, tables)).transpose(1, 2)


def _last_ring(a, n: int, size: int):
    """The ring of ``size`` slots after the last document's n tokens ``a`` [B, H, n, E]."""
    pad = a.new_zeros(*a.shape[:2], max(size - n, 0), a.shape[3])
    return seq_to_ring(torch.cat([pad, a], dim=2)[:, :, -size:], n)


def windowed_forward(spec, p, x, state, bounds):
    """Packed form of ``windowed.forward``: x [1, T, D] -> (y, last document's state, aux)."""
    B, T, _ = x.shape
    W, rd = spec.window, spec.readout
    last, n = bounds[-2], T - bounds[-2]
    dpos = doc_positions(bounds, x.device)
    tables = _tables(spec, x, dpos)
    q = _heads(spec, x, p["q_proj.weight"], tables)
    k = _heads(spec, x, p["k_proj.weight"], tables)
    v = _heads(spec, x, p["v_proj.weight"], None)
    new = {"pos": n}
    if W is None:
        new["k"], new["v"] = k[:, :, last:], v[:, :, last:]
    else:
        new["k"], new["v"] = _last_ring(k[:, :, last:], n, W), _last_ring(v[:, :, last:], n, W)
    s = fading = None
    if rd.fading:
        s, mstate, _ = mamba.forward(spec.fading_block, sub(p, "fading."), x,
                                     _fading_state(state), bounds)
        new.update(conv=mstate["conv"], ssm=mstate["ssm"])
        wk, wv = _fading_weights(spec, p)
        fk, fv = _heads(spec, s, wk, tables), _heads(spec, s, wv, None)
        fading = (fk, fv)
        new["fk"], new["fv"] = (_last_ring(a[:, :, last:], n, 2 * W) for a in fading)
    aux, store_parts = None, []
    if rd.store is not None:
        store_parts, aux, st_state = _store(spec, p, x, s, q, k, v, dpos, bounds)
        new.update(st_state)
    o = packed_readout(q, (_shared(spec, k), _shared(spec, v)), fading, W, bounds, store_parts)
    return _merge_heads(spec, p, o), new, aux


def _store(spec, p, x, s, q, k, v, dpos, bounds):
    """The store's partial softmax over every query, the aux loss and the last document's
    store state. Each document selects from an empty store, in its own chunks."""
    st, W = spec.readout.store, spec.window
    B, T, _ = x.shape
    if s is not None:
        s_prev = torch.cat([s.new_zeros(B, 1, s.shape[2]), s[:, :T - 1]], dim=1)
        s_prev = torch.where((dpos == 0)[None, :, None], 0.0, s_prev)  # s_0 = 0 per document
        scores = eidetic_store.innovation_scores(x, s_prev, p["pred_proj.weight"])
    else:
        scores = eidetic_store.innovation_scores(x, None, None)
    H, E = spec.n_heads, spec.head_dim
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        toks = {"k": k[:, :, a:b], "v": v[:, :, a:b], "score": scores[:, a:b],
                "pos": dpos[None, a:b].expand(B, b - a)}
        empty = [eidetic_store.empty(B, H, m, E, x.dtype, x.device) for m in (st.select,
                                                                            st.capacity)]
        snap, c0, front, cand, kept = eidetic_store.select(toks, *empty, 0, st.chunk,
                                                           st.select, st.capacity)
        if st.capacity:
            parts.append(store_partial(q[:, :, a:b], snap, c0, front, st.chunk, W,
                                       default_scale(E)))
    new = {"s_last": s[:, T - 1] if s is not None else x.new_zeros(B, spec.d_model)}
    new.update({"cand_" + f: a for f, a in cand.items()})
    new.update({"store_" + f: a for f, a in kept.items()})
    joined = [tuple(torch.cat(x_, dim=2) for x_ in zip(*parts, strict=True))] if parts else []
    return joined, scores.mean(), new


def mosaic_forward(spec, p, x, state, bounds):
    """Packed form of ``mosaic.forward``: a query reads the pairs of its own document only;
    x [1, T, D] -> (y, last document's state, None)."""
    B, T, D = x.shape
    M = spec.readout.capacity
    last, n = bounds[-2], T - bounds[-2]
    kbar, kbar_T = leaky_keys(spec, p, x, None, bounds)
    k = key_scale(p["k_scale"])[:, None] * l2_normalize(kbar)  # [B, T, H, E]
    u = split_heads(spec, linear(x, p["v_proj.weight"]))
    # Pair j = 0 .. T-2: key k_j, value from x_{j+1} and x_j (a document's last pair mixes in
    # the next document's first token, and no query of either document reads it).
    kp = k[:, :T - 1].transpose(1, 2)
    vp = _value(p, u[:, 1:], u[:, :T - 1]).transpose(1, 2)
    q = k.transpose(1, 2)
    # Query t reads pairs t - M' .. t - 1 of its document: a band (banded softmax, no T x T
    # matrix), M' the capacity or, without one, the longest document.
    reach = longest(bounds) if M is None else min(M, longest(bounds))
    if T > 1 and choose("associative_readout", "auto", x) == "triton":
        # The kernel reads one sequence: pair j's key is k_j, its value the j-th of vp (the
        # last key's value is never read, each query reading earlier pairs only).
        vseq = torch.cat([vp, vp.new_zeros(B, vp.shape[1], 1, vp.shape[3])], 2)
        y = associative_readout(k, vseq.transpose(1, 2), M, cu_tensor(bounds),
                                implementation="triton").transpose(1, 2)
    elif T > 1:
        pad = kp.new_zeros(B, kp.shape[1], reach, kp.shape[3])
        src = (torch.cat([pad, kp], 2), torch.cat([pad, vp], 2), -reach, 1, reach + 1)
        y = combine([band_partial(q, 0, [src], 1.0, seg=segment_ids(bounds, x.device))])
    else:
        y = torch.zeros_like(q)
    y = y.transpose(1, 2).reshape(B, T, D)
    mk, mv = kp[:, :, last:], vp[:, :, last:]  # the last document's n - 1 pairs
    if M is not None:
        mk, mv = _last_ring(mk, n - 1, M), _last_ring(mv, n - 1, M)
    new = {"pos": n, "kbar": kbar_T, "k_last": k[:, -1], "u_last": u[:, -1],
           "mem_k": mk, "mem_v": mv}
    return linear(y, p["o_proj.weight"]), new, None

