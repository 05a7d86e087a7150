"""Innovation selection and the eidetic store (DESIGN 2.4) in Triton.

Every ordering here is the design's total order: a filled slot (position >= 0) before an empty
one; among filled slots the higher score first (NaN above every number, as torch sorts it), and
on equal score the later position first;
empty slots by their index in the set being ranked. An entry's rank is the number of entries
that come before it, so ranks are a permutation and slot r of a result holds the entry of rank
r: no sort, only pairwise comparisons, which are exact for ties.

The kernels return indices into a source list, never copies of keys and values, so that the
caller gathers k and v with autograd (gradients flow into the stored keys and values, the
selection itself is not differentiable). For the per-chunk pipeline the source list is

    [previous store (M slots) | previous candidates (K slots) | the call's T tokens]

and -1 stands for a fresh empty slot (zero key and value, score 0, position -1).

- ``chunk_top``: per chunk, the K best of (candidates carried in, for the first chunk; fresh
  empty slots otherwise) and the chunk's tokens; one program per (batch, chunk).
- ``store_scan``: per batch row, walks the chunks in order: the snapshot before each chunk is the
  store so far, and after each complete chunk the store becomes the M best of (store, picks).
- ``top_kernel``: the n best of the union of two entry sets (``store_top``/``store_merge``).

The innovation scores themselves are a matmul and stay in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import check_device, check_float, empty

MIN_BLOCK = 2


@triton.jit
def _count_before(s_i, p_i, n_i, s_j, p_j, n_j, ok_j):
    """For each entry i, how many valid entries j come before it in the total order. [I]."""
    fi = p_i[:, None] >= 0
    fj = p_j[None, :] >= 0
    # A NaN score ranks above every other and ties with NaN (torch's sort order): without
    # that, no comparison with a NaN holds and two entries would share a rank.
    nan_i = s_i[:, None] != s_i[:, None]
    nan_j = s_j[None, :] != s_j[None, :]
    higher = (s_j[None, :] > s_i[:, None]) | (nan_j & (nan_i == 0))
    equal = (s_j[None, :] == s_i[:, None]) | (nan_j & nan_i)
    better = higher | (equal & (p_j[None, :] > p_i[:, None]))
    before = ((fj & (fi == 0)) | (fi & fj & better)
              | ((fi == 0) & (fj == 0) & (n_j[None, :] < n_i[:, None])))
    return tl.sum((before & ok_j[None, :]).to(tl.int32), axis=1)


@triton.jit
def _take(r, rank, ok, src, pos):
    """Entries of rank r from one part of a ranked set: (found, source index, position). [R]."""
    hit = (rank[None, :] == r[:, None]) & ok[None, :]
    found = tl.sum(hit.to(tl.int32), axis=1) > 0
    return (found, tl.sum(tl.where(hit, src[None, :], 0), axis=1),
            tl.sum(tl.where(hit, pos[None, :], 0), axis=1))


@triton.jit
def _best_of_two(r, s_a, p_a, x_a, ok_a, s_b, p_b, x_b, ok_b, NA):
    """Slots r of the ranked union of part a (indices 0..NA-1) and part b (NA + j):
    (source index, position), -1 and -1 where the union has no entry of that rank."""
    n_a = tl.arange(0, s_a.shape[0])
    n_b = NA + tl.arange(0, s_b.shape[0])
    rank_a = _count_before(s_a, p_a, n_a, s_a, p_a, n_a, ok_a) + \
        _count_before(s_a, p_a, n_a, s_b, p_b, n_b, ok_b)
    rank_b = _count_before(s_b, p_b, n_b, s_a, p_a, n_a, ok_a) + \
        _count_before(s_b, p_b, n_b, s_b, p_b, n_b, ok_b)
    fa, xa, pa = _take(r, rank_a, ok_a, x_a, p_a)
    fb, xb, pb = _take(r, rank_b, ok_b, x_b, p_b)
    return tl.where(fa | fb, xa + xb, -1), tl.where(fa | fb, pa + pb, -1)


@triton.jit
def _load_set(score, pos, b, N, BLOCK: tl.constexpr):
    """Batch row b of an entry set [B, N] as (index, valid, score, position) [BLOCK]; slots past
    N are empty."""
    n = tl.arange(0, BLOCK)
    ok = n < N
    return (n, ok, tl.load(score + b * N + n, mask=ok, other=0.0),
            tl.load(pos + b * N + n, mask=ok, other=-1))


@triton.jit
def _top_kernel(sa, pa, sb, pb, out_idx, out_pos, NA, NB, N,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """The N best of (a [B, NA], b [B, NB]) per batch row; indices into [a | b]."""
    b = tl.program_id(0).to(tl.int64)
    ia, ok_a, s_a, p_a = _load_set(sa, pa, b, NA, BLOCK_A)
    ib, ok_b, s_b, p_b = _load_set(sb, pb, b, NB, BLOCK_B)
    for r0 in range(0, N, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        x, p = _best_of_two(r, s_a, p_a, ia.to(tl.int64), ok_a, s_b, p_b,
                            (NA + ib).to(tl.int64), ok_b, NA)
        tl.store(out_idx + b * N + r, x, mask=r < N)
        tl.store(out_pos + b * N + r, p, mask=r < N)


@triton.jit
def _chunk_top_kernel(score, cand_score, cand_pos, pick_idx, pick_pos, T, POS0, FIRST, C, K, M,
                      NCH, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (c, b): the K best of chunk c's candidates, in order, as [B, NCH, K]. Chunks
    run along the grid's first axis, the only one that holds more than 65535 programs."""
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    ik = tl.arange(0, BLOCK_K)
    ok_k = ik < K
    # the candidates carried in belong to the first chunk; later chunks start from empty slots
    first = c == 0
    carried = ok_k & ((ik * 0 + c) == 0)  # as a vector: the interpreter masks with vectors only
    s_a = tl.load(cand_score + b * K + ik, mask=carried, other=0.0)
    p_a = tl.load(cand_pos + b * K + ik, mask=carried, other=-1)
    x_a = tl.where(first, M + ik, -1).to(tl.int64)
    # tokens of chunk c: the first chunk may be cut short by where the call starts
    t0 = tl.where(first, 0, FIRST + (c - 1) * C)
    t1 = tl.minimum(tl.where(first, FIRST, FIRST + c * C), T)
    t = t0 + tl.arange(0, BLOCK_C).to(tl.int64)
    ok_t = t < t1
    s_b = tl.load(score + b * T + t, mask=ok_t, other=0.0).to(s_a.dtype)
    p_b = tl.where(ok_t, POS0 + t, -1)
    x_b = M + K + t
    r = ik
    x, p = _best_of_two(r, s_a, p_a, x_a, ok_k, s_b, p_b, x_b, ok_t, K)
    tl.store(pick_idx + (b * NCH + c) * K + r, x, mask=ok_k)
    tl.store(pick_pos + (b * NCH + c) * K + r, p, mask=ok_k)


@triton.jit
def _store_scan_kernel(store_score, store_pos, score, cand_score, pick_idx, pick_pos,
                       snap_idx, snap_pos, out_idx, out_pos, T, M, K, NCH, NFULL,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program b: the store entering every chunk ([B, NCH, M]) and after the call ([B, M])."""
    b = tl.program_id(0).to(tl.int64)
    im, ok_m, s_st, p_st = _load_set(store_score, store_pos, b, M, BLOCK_M)
    ik = tl.arange(0, BLOCK_K)
    ok_k = ik < K
    x_st = im.to(tl.int64)
    for c in range(0, NCH):
        tl.store(snap_idx + (b * NCH + c) * M + im, x_st, mask=ok_m)
        tl.store(snap_pos + (b * NCH + c) * M + im, p_st, mask=ok_m)
        if c < NFULL:
            x_pk = tl.load(pick_idx + (b * NCH + c) * K + ik, mask=ok_k, other=-1)
            p_pk = tl.load(pick_pos + (b * NCH + c) * K + ik, mask=ok_k, other=-1)
            # a pick's score from its source: a carried candidate or a token (fresh: 0)
            from_cand = (x_pk >= M) & (x_pk < M + K)
            from_tok = x_pk >= M + K
            s_pk = tl.load(cand_score + b * K + (x_pk - M), mask=ok_k & from_cand, other=0.0)
            s_pk = tl.where(from_tok, tl.load(score + b * T + (x_pk - M - K),
                                              mask=ok_k & from_tok, other=0.0).to(s_pk.dtype),
                            s_pk)
            x_new, p_new = _best_of_two(im, s_st, p_st, x_st, ok_m, s_pk, p_pk, x_pk, ok_k, M)
            # the store's scores follow its entries: the old store's or the picks'
            s_new = tl.sum(tl.where((x_new[:, None] == x_st[None, :]) & ok_m[None, :],
                                    s_st[None, :], 0.0), axis=1) + \
                tl.sum(tl.where((x_new[:, None] == x_pk[None, :]) & ok_k[None, :]
                                & (x_new[:, None] >= 0), s_pk[None, :], 0.0), axis=1)
            s_st, p_st, x_st = s_new, p_new, x_new
    tl.store(out_idx + b * M + im, x_st, mask=ok_m)
    tl.store(out_pos + b * M + im, p_st, mask=ok_m)


def _cmp_dtype(*scores) -> torch.dtype:
    """Scores are compared as float64 if any is, else as float32 (exact for every narrower
    float, so the order and the ties are the same as in the input dtype)."""
    return torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32


def _block(n: int) -> int:
    return max(triton.next_power_of_2(max(n, 1)), MIN_BLOCK)


def _check_set(where, name, score, pos, batch=None):
    check_float(where, f"{name} score", score)
    if score.ndim != 2 or tuple(pos.shape) != tuple(score.shape):
        raise ValueError(f"{where}: {name} score and pos must be [B, S] of one shape, got "
                         f"{tuple(score.shape)} and {tuple(pos.shape)}")
    if pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise TypeError(f"{where}: {name} pos must be an integer tensor, got {pos.dtype}")
    if batch is not None and score.shape[0] != batch:
        raise ValueError(f"{where}: {name} must have batch {batch}, got {score.shape[0]}")


def top_indices(score_a, pos_a, score_b, pos_b, n):
    """The n best entries of the union of two sets, as (index into [a | b], position), [B, n];
    -1 and -1 for slots past the union's size. score_*: [B, S_*] float, pos_*: [B, S_*] int."""
    where = "top_indices"
    _check_set(where, "a", score_a, pos_a)
    _check_set(where, "b", score_b, pos_b, score_a.shape[0])
    check_device(where, score_a, pos_a=pos_a, score_b=score_b, pos_b=pos_b)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{where}: n must be a non-negative int, got {n!r}")
    Bt, NA = score_a.shape
    NB = score_b.shape[1]
    dt = _cmp_dtype(score_a, score_b)
    idx = empty((Bt, n), torch.int64, score_a.device)
    pos = empty((Bt, n), torch.int64, score_a.device)
    if Bt == 0 or n == 0:
        return idx, pos
    _top_kernel[(Bt,)](score_a.to(dt).contiguous(), pos_a.to(torch.int64).contiguous(),
                       score_b.to(dt).contiguous(), pos_b.to(torch.int64).contiguous(),
                       idx, pos, NA, NB, n, BLOCK_A=_block(NA), BLOCK_B=_block(NB),
                       BLOCK_R=min(_block(n), 64))
    return idx, pos


def _gather_set(sets, idx):
    """Entries ``idx`` [B, n] (-1: a fresh empty slot) of the concatenation of entry sets."""
    k = torch.cat([s["k"] for s in sets], 2)
    v = torch.cat([s["v"] for s in sets], 2)
    score = torch.cat([s["score"] for s in sets], 1)
    pos = torch.cat([s["pos"].to(torch.int64) for s in sets], 1)
    Bt, H, S, E = k.shape
    # one zero row at index S stands for every fresh empty slot
    k = torch.cat([k, k.new_zeros(Bt, H, 1, E)], 2)
    v = torch.cat([v, v.new_zeros(Bt, H, 1, E)], 2)
    score = torch.cat([score, score.new_zeros(Bt, 1)], 1)
    pos = torch.cat([pos, pos.new_full((Bt, 1), -1)], 1)
    j = torch.where(idx < 0, S, idx)
    jk = j[:, None, :, None].expand(Bt, H, j.shape[1], E)
    return {"k": torch.gather(k, 2, jk), "v": torch.gather(v, 2, jk),
            "score": torch.gather(score, 1, j), "pos": torch.gather(pos, 1, j)}


def _check_entries(where, name, e):
    if not isinstance(e, dict) or any(f not in e for f in ("k", "v", "score", "pos")):
        raise TypeError(f"{where}: {name} must be a dict with k, v, score and pos")
    check_float(where, f"{name}['k']", e["k"])
    if e["k"].ndim != 4 or e["v"].shape != e["k"].shape:
        raise ValueError(f"{where}: {name}['k'] and ['v'] must be [B, H, S, E] of one shape, "
                         f"got {tuple(e['k'].shape)} and {tuple(e['v'].shape)}")
    want = (e["k"].shape[0], e["k"].shape[2])
    if tuple(e["score"].shape) != want or tuple(e["pos"].shape) != want:
        raise ValueError(f"{where}: {name}['score'] and ['pos'] must be [B, S] = {want}, got "
                         f"{tuple(e['score'].shape)} and {tuple(e['pos'].shape)}")


def store_top(entries: dict, n: int) -> dict:
    """The first n entries in the total order (DESIGN 2.4)."""
    _check_entries("store_top", "entries", entries)
    e = entries
    none_s = e["score"][:, :0]
    idx, _ = top_indices(e["score"], e["pos"], none_s, e["pos"][:, :0], n)
    return _gather_set([e], idx)


def store_merge(a: dict, b: dict, n: int) -> dict:
    """The best n entries of a union b (DESIGN 2.4)."""
    _check_entries("store_merge", "a", a)
    _check_entries("store_merge", "b", b)
    idx, _ = top_indices(a["score"], a["pos"], b["score"], b["pos"], n)
    return _gather_set([a, b], idx)


def select_indices(score, pos, chunk, select, store_score, store_pos, cand_score, cand_pos):
    """Indices of the per-chunk pipeline (module docstring), for tokens at pos .. pos + T - 1.

    score: [B, T] innovation scores; store_*: [B, M] the store entering the call; cand_*: [B, K]
    the candidates of the chunk in progress (K = select). Returns a dict of int64 tensors, each
    an index into [store | candidates | tokens] (-1: fresh empty) with its position:
    ``snap_idx``/``snap_pos`` [B, nS, M], the store seen by each chunk the call touches;
    ``store_idx``/``store_pos`` [B, M] and ``cand_idx``/``cand_pos`` [B, K] after the call.
    """
    where = "select_indices"
    _check_set(where, "tokens'", score, torch.zeros_like(score, dtype=torch.int64))
    Bt, T = score.shape
    _check_set(where, "store", store_score, store_pos, Bt)
    _check_set(where, "candidates", cand_score, cand_pos, Bt)
    check_device(where, score, store_score=store_score, store_pos=store_pos,
                 cand_score=cand_score, cand_pos=cand_pos)
    for name, val, low in (("pos", pos, 0), ("chunk", chunk, 1), ("select", select, 0)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ValueError(f"{where}: {name} must be an int >= {low}, got {val!r}")
    M, K = store_score.shape[1], cand_score.shape[1]
    if K != select:
        raise ValueError(f"{where}: the candidates must have select = {select} slots, got {K}")
    dev = score.device
    ar_m = torch.arange(M, device=dev).expand(Bt, M)
    ar_k = (M + torch.arange(K, device=dev)).expand(Bt, K)
    if T == 0:
        none = torch.zeros(Bt, 0, M, dtype=torch.int64, device=dev)
        return {"snap_idx": none, "snap_pos": none.clone(), "store_idx": ar_m.clone(),
                "store_pos": store_pos.to(torch.int64).clone(), "cand_idx": ar_k.clone(),
                "cand_pos": cand_pos.to(torch.int64).clone()}
    first = min(chunk - pos % chunk, T)
    nch = 1 + triton.cdiv(T - first, chunk)
    nfull = nch if (pos + T) % chunk == 0 else nch - 1
    dt = _cmp_dtype(score, cand_score, store_score)
    score_c, cand_s = score.to(dt).contiguous(), cand_score.to(dt).contiguous()
    pick_idx = empty((Bt, nch, K), torch.int64, dev)
    pick_pos = empty((Bt, nch, K), torch.int64, dev)
    if K > 0:
        _chunk_top_kernel[(nch, Bt)](score_c, cand_s, cand_pos.to(torch.int64).contiguous(),
                                     pick_idx, pick_pos, T, pos, first, chunk, K, M, nch,
                                     BLOCK_K=_block(K), BLOCK_C=_block(chunk))
    out = {"snap_idx": empty((Bt, nch, M), torch.int64, dev),
           "snap_pos": empty((Bt, nch, M), torch.int64, dev),
           "store_idx": empty((Bt, M), torch.int64, dev),
           "store_pos": empty((Bt, M), torch.int64, dev)}
    if M > 0:
        _store_scan_kernel[(Bt,)](store_score.to(dt).contiguous(),
                                  store_pos.to(torch.int64).contiguous(), score_c, cand_s,
                                  pick_idx, pick_pos, out["snap_idx"], out["snap_pos"],
                                  out["store_idx"], out["store_pos"], T, M, K, nch, nfull,
                                  BLOCK_M=_block(M), BLOCK_K=_block(K))
    if nfull == nch:  # the call ends on a chunk edge: the next chunk starts from empty slots
        out["cand_idx"] = torch.full((Bt, K), -1, dtype=torch.int64, device=dev)
        out["cand_pos"] = out["cand_idx"].clone()
    else:
        out["cand_idx"], out["cand_pos"] = pick_idx[:, -1], pick_pos[:, -1]
    return out


def innovation_select(tokens: dict, pos: int, chunk: int, select: int, store: dict,
                      cand: dict):
    """The store part of the parallel bmojo layer (DESIGN 2.4) from the kernels' indices.

    tokens: entry set of the call's T tokens (k, v [B, H, T, E], score [B, T]; its pos is
    ignored, the tokens sit at pos .. pos + T - 1); store: entry set of M slots; cand: entry set
    of ``select`` slots. Returns (snapshots, store, cand): snapshots an entry set of nS * M
    slots (the store each touched chunk sees, chunk after chunk), then the store and the
    candidates after the call, all differentiable in the keys and values.
    """
    ix = select_indices(tokens["score"].detach(), pos, chunk, select,
                        store["score"].detach(), store["pos"], cand["score"].detach(),
                        cand["pos"])
    Bt, T = tokens["score"].shape
    toks = dict(tokens, pos=pos + torch.arange(T, device=tokens["score"].device).expand(Bt, T))
    sets = [store, cand, toks]
    snaps = _gather_set(sets, ix["snap_idx"].reshape(Bt, -1))
    return snaps, _gather_set(sets, ix["store_idx"]), _gather_set(sets, ix["cand_idx"])


def innovation_select_ref(tokens: dict, pos: int, chunk: int, select: int, store: dict,
                          cand: dict, merge):
    """The same pipeline written as the reference layer writes it, with ``merge`` the store
    merge to use (a chunk loop over merges; for tests)."""
    Bt, T = tokens["score"].shape
    toks = dict(tokens, pos=pos + torch.arange(T, device=tokens["score"].device).expand(Bt, T))
    snaps = []
    a = pos
    while a < pos + T:
        c = a // chunk
        b = min((c + 1) * chunk, pos + T)
        snaps.append(store)
        seg = {f: (toks[f][:, :, a - pos:b - pos] if f in ("k", "v")
                   else toks[f][:, a - pos:b - pos]) for f in ("k", "v", "score", "pos")}
        cand = merge(cand, seg, select)
        if b == (c + 1) * chunk:
            store = merge(store, cand, store["score"].shape[1])
            H, E = toks["k"].shape[1], toks["k"].shape[3]
            z = toks["k"].new_zeros(Bt, H, select, E)
            cand = {"k": z, "v": z.clone(), "score": toks["score"].new_zeros(Bt, select),
                    "pos": torch.full((Bt, select), -1, dtype=torch.int64,
                                      device=z.device)}
        a = b
    if snaps:
        snaps = {f: torch.cat([s[f] for s in snaps], 2 if f in ("k", "v") else 1)
                 for f in ("k", "v", "score", "pos")}
    else:
        snaps = _gather_set([store], torch.zeros(Bt, 0, dtype=torch.int64,
                                                 device=store["pos"].device))
    return snaps, store, cand
