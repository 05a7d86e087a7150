"""The plain-JAX selective scan (DESIGN 2.1) as one ``jax.custom_vjp``: the two-level forward of
``selective_scan`` and a hand-written backward, as the torch path's.

Time is cut into nc chunks of L steps (the tail padded with dt = 0 and dt u = 0, which leave the
state unchanged; so are the few whole chunks that make nc a multiple of the backward's group
size). Forward: every chunk from a zero start, all chunks at once (a ``lax.scan`` over the L
positions), the chunk level (a ``lax.scan`` over the chunks) for each chunk's entering state
H_c, and the L positions again from those, contracting y_t = C_t . h_t as each state is formed.
Only H [nc, Bt, Dc, N] is kept, never the [T, Bt, Dc, N] states, and each walk forms its decays
exp(dt A) as it goes (kept [T, Bt, Dc, N] decays measured slower on CPU: writing a buffer that
large costs more than the exponentials it saves).

Backward, the adjoint g_t = C_t gy_t + a_{t+1} g_{t+1} of the state at t run in reverse with
the same two levels: in-chunk from a zero end (all chunks at once), over chunks for the adjoint
E_c arriving at each chunk's end, then per group of chunks the states recomputed from H (kept
for the group: about ``GROUP_ELEMENTS``) and the adjoint run back from E, with every gradient
read off as it passes. The groups read and write the whole-sequence arrays in place. A zero
cotangent contributes nothing: each product with a forward value selects with ``where``
instead of multiplying, so a non-finite input at t (whose state and outputs from t on are
non-finite) leaves the gradients of every loss on the outputs before t as in the clean run.

Packed rows (``reset`` [T] bool, a document's first token): the state entering a reset
position is replaced by zero, and the adjoint leaving it backwards is zero, both selected with
``where`` (a decay of zero times another document's NaN would be NaN); a chunk holding a reset
forgets the state that entered it. ``reset=None`` runs the code without these selections.

Core layout (time first): dt, w = dt u, gy [L, nc, Bt, G, Dg]; B, C [L, nc, Bt, G, N]; A
[G, Dg, N]; states [nc, Bt, G, Dg, N] (G = 1 for ungrouped B and C); resets [L, nc] and the
chunks holding one, cut [nc].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .numerics import sigmoid, silu, softplus

# States recomputed at once by the backward (per group of chunks): bounds its memory to
# about this many elements beside the O(T (Dc + N)) inputs.
GROUP_ELEMENTS = 1 << 23


def _sel(g, x):
    """g * x where the cotangent g is nonzero, else 0 (also against a non-finite x)."""
    return jnp.where(g == 0, jnp.zeros((), g.dtype), g * x)


def _sel_wide(g, x):
    """``_sel`` for a cotangent g that broadcasts up to x's shape (gy [..., Dg, 1]).

    The zero test runs on the product's shape: XLA's CPU code for a select whose predicate is
    broadcast along the state axis measured 4x slower than the rest of the adjoint's step. It is
    the same test: with x replaced by 1 where it is zero or not finite, g x' == 0 holds where
    g == 0, and otherwise only where g x underflows to 0, whose product is 0 anyway."""
    one = jnp.ones((), x.dtype)
    return jnp.where(g * jnp.where(jnp.isfinite(x) & (x != 0), x, one) == 0,
                     jnp.zeros((), g.dtype), g * x)


def _to_chunks(x, nc: int, L: int):
    """[..., T] -> [L, nc, ...], the tail padded with zeros."""
    pad = nc * L - x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return jnp.moveaxis(x.reshape(x.shape[:-1] + (nc, L)), (-1, -2), (0, 1))


def _from_chunks(x, T: int):
    """[L, nc, ...] -> [..., T]."""
    x = jnp.moveaxis(x, (0, 1), (-1, -2))
    return x.reshape(x.shape[:-2] + (-1,))[..., :T]


def _grouped(M):
    """B or C [Bt, N, T] or [Bt, G, N, T] -> [Bt, G, N, T]."""
    return M[:, None] if M.ndim == 3 else M


def _decay(dt, A):
    """exp(dt A): dt [..., G, Dg], A [G, Dg, N] -> [..., G, Dg, N]."""
    return jnp.exp(dt[..., None] * A)


def _advance(h, a, w_l, b_l):
    """a h + w B. h, a [..., Dg, N]; w_l [..., Dg]; b_l [..., N]."""
    return a * h + w_l[..., None] * b_l[..., None, :]


def _cut(flag, x):
    """Zero where ``flag`` (one per chunk: [nc], or a scalar) holds, else x [nc?, Bt, ...]."""
    flag = jnp.reshape(flag, jnp.shape(flag) + (1,) * (x.ndim - jnp.ndim(flag)))
    return jnp.where(flag, jnp.zeros((), x.dtype), x)


def _restart(h, r_l):
    """The state entering position l: zero where a document starts there (r_l [nc])."""
    return h if r_l is None else _cut(r_l, h)


def _contract(h, c_l):
    """C . h over the state axis: h [..., Dg, N], c_l [..., N] -> [..., Dg]. A dot: the same
    sum as a multiply-reduce, which XLA's CPU code ran 8x slower."""
    return jnp.einsum("...dn,...n->...d", h, c_l)


def _group_size(nc: int, per_chunk: int) -> tuple[int, int]:
    """(chunks per group n, groups ng) for the backward: n chunks of ``per_chunk`` states
    within ``GROUP_ELEMENTS``, the groups as even as the count allows (ng n - nc < ng)."""
    most = max(1, min(nc, GROUP_ELEMENTS // max(1, per_chunk)))
    ng = -(-nc // most)
    return -(-nc // ng), ng


def _scan_forward(dt, w, A, Bc, Cc, h0, rc=None):
    """-> y [L, nc, Bt, G, Dg], h_T, entering states H and whole-chunk decays [nc, ...].
    ``rc`` [L, nc]: resets (None: none)."""
    nc = dt.shape[1]
    zero = jnp.zeros((nc,) + h0.shape, h0.dtype)

    def free(carry, xs):  # also each chunk's sum of dt, for its whole decay
        h, s = carry
        dt_l, w_l, b_l, r_l = xs
        return (_advance(_restart(h, r_l), _decay(dt_l, A), w_l, b_l), s + dt_l), None

    (ends, dt_sum), _ = jax.lax.scan(free, (zero, jnp.zeros_like(dt[0])), (dt, w, Bc, rc))
    tot = _decay(dt_sum, A)

    def carry(h, xs):
        tot_c, end_c, cut_c = xs
        nxt = tot_c * h + end_c
        return (nxt if cut_c is None else jnp.where(cut_c, end_c, nxt)), h

    cut = None if rc is None else jnp.any(rc, axis=0)
    hT, H = jax.lax.scan(carry, h0, (tot, ends, cut))

    def out(h, xs):
        dt_l, w_l, b_l, c_l, r_l = xs
        h = _advance(_restart(h, r_l), _decay(dt_l, A), w_l, b_l)
        return h, _contract(h, c_l)

    _, y = jax.lax.scan(out, H, (dt, w, Bc, Cc, rc))
    return y, hT, H, tot


def _group_backward(A, c0, n: int, dt, w, Bc, Cc, gy, H, E, rc=None):
    """Chunks c0 .. c0 + n - 1 (c0 may be traced) of the whole-sequence arrays: the states
    recomputed from H, the adjoint run back from E.
    -> (gdt, gw [L, n, Bt, G, Dg], gB, gC [L, n, Bt, G, N], gA [G, Dg, N])."""
    L = dt.shape[0]

    def at(x, l):  # position l of the group's chunks: read in place, not copied per group
        if x is None:
            return None
        start = (l, c0) + (0,) * (x.ndim - 2)
        return jax.lax.dynamic_slice(x, start, (1, n) + x.shape[2:])[0]

    def states(h, l):
        dt_l, w_l, b_l, gy_l, r_l = (at(x, l) for x in (dt, w, Bc, gy, rc))
        p = _restart(h, r_l)
        h = _advance(p, _decay(dt_l, A), w_l, b_l)
        # gC needs h_l and gy_l only: read out here, not from h_l formed again in reverse
        return h, (p, jnp.sum(_sel_wide(gy_l[..., None], h), axis=-2))

    # prev[l]: the state entering position l (zero at a reset)
    _, (prev, gC) = jax.lax.scan(states, jax.lax.dynamic_slice_in_dim(H, c0, n), jnp.arange(L))

    def back(carry, xs):
        e, gA = carry
        l, p_l = xs
        dt_l, w_l, b_l, c_l, gy_l, r_l = (at(x, l) for x in (dt, w, Bc, Cc, gy, rc))
        g = e + _sel_wide(gy_l[..., None], c_l[..., None, :])
        gw = jnp.sum(_sel(g, b_l[..., None, :]), axis=-1)
        gB = jnp.sum(_sel(g, w_l[..., None]), axis=-2)
        e = _restart(_sel(g, _decay(dt_l, A)), r_l)  # nothing flows back across a start
        dlog = _sel(e, p_l)  # d/d(log a_l) = a_l g_l h_{l-1}
        # summed over chunks once, after the walk
        gA = gA + _sel(dlog, dt_l[..., None])
        # a select, not dlog * A: XLA's CPU code fuses a product with the broadcast A into the
        # reduction, which made the whole step 2x slower
        return (e, gA), (jnp.sum(_sel(dlog, A), axis=-1), gw, gB)

    e0 = jax.lax.dynamic_slice_in_dim(E, c0, n)
    (_, gA), (gdt, gw, gB) = jax.lax.scan(back, (e0, jnp.zeros_like(e0)), (jnp.arange(L), prev),
                                          reverse=True)
    return gdt, gw, gB, gC, jnp.sum(gA, axis=(0, 1))


def _scan_backward(A, dt, w, Bc, Cc, H, tot, gy, ghT, rc, n: int):
    """Cotangents of (y, h_T) -> (gdt, gw, gA, gB, gC, gh0), in the core layout; the states
    recomputed n chunks at a time (n divides nc)."""
    L, nc = dt.shape[:2]

    def free(e, xs):  # in-chunk, from a zero end: the adjoint leaving each chunk's start
        dt_l, gy_l, c_l, r_l = xs
        g = e + _sel_wide(gy_l[..., None], c_l[..., None, :])
        return _restart(_sel(g, _decay(dt_l, A)), r_l), None

    leave, _ = jax.lax.scan(free, jnp.zeros_like(H), (dt, gy, Cc, rc), reverse=True)

    def over(E, xs):  # E: the adjoint arriving at chunk c's end from the chunks after it
        leave_c, tot_c, cut_c = xs
        through = _sel(E, tot_c)
        return leave_c + (through if cut_c is None else _cut(cut_c, through)), E

    cut = None if rc is None else jnp.any(rc, axis=0)
    gh0, E = jax.lax.scan(over, ghT, (leave, tot, cut), reverse=True)

    ng = nc // n
    args = (dt, w, Bc, Cc, gy, H, E, rc)
    if ng == 1:
        gdt, gw, gB, gC, gA = _group_backward(A, 0, nc, *args)
        return gdt, gw, gA, gB, gC, gh0

    def group(acc, k):  # each group's gradients written into the whole arrays
        *whole, gA = acc
        gdt, gw, gB, gC, gA_k = _group_backward(A, k * n, n, *args)
        whole = [jax.lax.dynamic_update_slice_in_dim(x, v, k * n, axis=1)
                 for x, v in zip(whole, (gdt, gw, gB, gC), strict=True)]
        return (*whole, gA + gA_k), None

    zeros = (jnp.zeros_like(dt), jnp.zeros_like(w), jnp.zeros_like(Bc), jnp.zeros_like(Cc),
             jnp.zeros_like(A))
    (gdt, gw, gB, gC, gA), _ = jax.lax.scan(group, zeros, jnp.arange(ng))
    return gdt, gw, gA, gB, gC, gh0


def _prologue(delta, delta_bias, delta_softplus: bool):
    x = delta if delta_bias is None else delta + delta_bias[None, :, None]
    return x, (softplus(x) if delta_softplus else x)


def _forward(u, delta, A, B, C, D, z, delta_bias, h0, reset, delta_softplus, L):
    Bt, Dc, T = u.shape
    Bg = _grouped(B)
    G, N = Bg.shape[1], A.shape[1]
    # whole padded chunks up to a multiple of the backward's group size
    nc = -(-T // L)
    n, ng = _group_size(nc, L * Bt * Dc * N)
    nc = n * ng
    x, dt = _prologue(delta, delta_bias, delta_softplus)

    def core(a):  # [Bt, Dc, T] -> [L, nc, Bt, G, Dg]
        c = _to_chunks(a, nc, L)
        return c.reshape(c.shape[:3] + (G, Dc // G))

    dtc, wc = core(dt), core(dt * u)
    Bc, Cc = _to_chunks(Bg, nc, L), _to_chunks(_grouped(C), nc, L)
    Ag = A.reshape(G, Dc // G, N)
    rc = None if reset is None else _to_chunks(reset, nc, L)  # the padding: no reset
    yc, hT, H, tot = _scan_forward(dtc, wc, Ag, Bc, Cc, h0.reshape(Bt, G, Dc // G, N), rc)
    y = _from_chunks(yc.reshape(yc.shape[:3] + (Dc,)), T)
    if D is not None:
        y = y + D[None, :, None] * u
    pre = y
    if z is not None:
        y = y * silu(z)
    # H as [ng, n, ...]: the backward's grouping travels in its shape
    H = H.reshape((ng, n) + H.shape[1:])
    res = (u, x, dt, A, B, C, D, z, delta_bias, dtc, wc, Bc, Cc, H, tot, pre, rc)
    return (y, hT.reshape(Bt, Dc, N)), res


@partial(jax.custom_vjp, nondiff_argnums=(10, 11))
def fused_scan(u, delta, A, B, C, D, z, delta_bias, h0, reset, delta_softplus, L):
    """The selective scan from validated arrays in the accumulation dtype -> (y [Bt, Dc, T],
    h_T [Bt, Dc, N]), T >= 1. u, delta, z: [Bt, Dc, T]; A: [Dc, N]; B, C: [Bt, (G,) N, T];
    D, delta_bias: [Dc] (D, z, delta_bias may be None); h0: [Bt, Dc, N]; reset: [T] bool or
    None (the state restarts from zero there); L: in-chunk length."""
    return _forward(u, delta, A, B, C, D, z, delta_bias, h0, reset, delta_softplus, L)[0]


def _fwd(u, delta, A, B, C, D, z, delta_bias, h0, reset, delta_softplus, L):
    return _forward(u, delta, A, B, C, D, z, delta_bias, h0, reset, delta_softplus, L)


def _bwd(delta_softplus, L, res, cts):
    u, x, dt, A, B, C, D, z, delta_bias, dtc, wc, Bc, Cc, H, tot, pre, rc = res
    n = H.shape[1]
    H = H.reshape((-1,) + H.shape[2:])
    gy, ghT = cts
    Bt, Dc, T = u.shape
    G, N = Bc.shape[3], A.shape[1]
    gz = None
    if z is not None:
        s = sigmoid(z)
        gz = _sel(gy, pre * s * (1 + z * (1 - s)))
        gy = _sel(gy, silu(z))
    gD = None if D is None else jnp.sum(_sel(gy, u), axis=(0, 2))
    gu = 0 if D is None else _sel(gy, D[None, :, None])
    gyc = _to_chunks(gy, dtc.shape[1], L)
    gyc = gyc.reshape(gyc.shape[:3] + (G, Dc // G))
    gdtc, gwc, gA, gBc, gCc, gh0 = _scan_backward(A.reshape(G, Dc // G, N), dtc, wc, Bc, Cc, H,
                                                  tot, gyc, ghT.reshape(H.shape[1:]), rc, n)

    def flat(g):  # [L, nc, Bt, G, Dg] -> [Bt, Dc, T]
        return _from_chunks(g.reshape(g.shape[:3] + (Dc,)), T)

    gw = flat(gwc)
    gu = gu + _sel(gw, dt)
    gdt = flat(gdtc) + _sel(gw, u)
    gdelta = _sel(gdt, sigmoid(x)) if delta_softplus else gdt
    gbias = None if delta_bias is None else jnp.sum(gdelta, axis=(0, 2))
    gB, gC = _from_chunks(gBc, T), _from_chunks(gCc, T)
    if B.ndim == 3:
        gB, gC = gB[:, 0], gC[:, 0]
    return (gu, gdelta, gA.reshape(Dc, N), gB, gC, gD, gz, gbias,
            gh0.reshape(Bt, Dc, N), None)


fused_scan.defvjp(_fwd, _bwd)
