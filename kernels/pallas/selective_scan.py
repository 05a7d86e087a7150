"""Chunked selective scan (DESIGN 2.1) for JAX: forward in Pallas, backward through custom_vjp.

    dt_t = delta_t + delta_bias (softplus if asked);  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t
    y_t  = h_t . C_t + D u_t, times silu(z_t) if z is given

Forward: one program per (batch, group, tile of BD channels) holds h [BD, N] in registers (float32,
or float64 for float64 inputs) and walks time in chunks of L steps: each chunk's inputs are loaded
as [BD, L] / [N, L] tiles, stepped through in order, and its outputs stored as one [BD, L] tile.
Grouped B and C ([B, G, N, T]) are read per group, never expanded to every channel. Shapes are
padded to powers of two (the GPU lowering's tile rule); padded time steps get dt = 0, so they leave
the state unchanged and the final state is exact.

Backward: a reverse-time Pallas kernel (``selective_scan_bwd``) that starts each chunk from the
state the forward saved at its entry; gradients reach every input, including ``initial_state``,
and flow back from the final state. ``selective_scan_ref`` is the same scan in plain JAX (a
jitted, per-chunk rematerialised ``lax.scan``); tests hold both directions to the spec reference.

Packed rows (``reset`` bool [T], the same for every batch row): where reset[t] holds the state
restarts from zero before step t (h_t = dt_t u_t B_t), selected with ``where`` so that a
non-finite state never reaches the next document; the backward lets nothing flow from step t
into h_{t-1}. The flags travel as an int32 [Tp] input (padded steps: no reset).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

CHUNK = 16  # time steps per loaded tile
BLOCK_D = 32  # channels per program (at most)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _softplus(x):
    e = jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.where(x > 0, x + e, e)


def _silu(x):
    e = jnp.exp(-jnp.abs(x))
    return x * jnp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _restart(h, flag):
    """The state entering a step: zero where its reset flag [1] is set (selected, so that a
    non-finite state of the previous document does not pass)."""
    return jnp.where(flag[:, None] != 0, jnp.zeros((), h.dtype), h)


def _scan_kernel(*refs, T, L, n_chunks, softplus, has_z, acc, save=False, has_reset=False):
    n_in = 8 + has_z + has_reset
    ins = list(refs[:n_in])
    reset_ref = ins.pop() if has_reset else None
    if has_z:
        u_ref, dt_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, h0_ref = ins
    else:
        u_ref, dt_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, h0_ref = ins
        z_ref = None
    y_ref, ht_ref, hc_ref = refs[-3:] if save else refs[-2:] + (None,)
    A = a_ref[...].astype(acc)  # [BD, N]
    Dv = d_ref[...].astype(acc)  # [BD]
    bias = bias_ref[...].astype(acc)
    lane = lax.broadcasted_iota(jnp.int32, (1, L), 1)  # [1, L]

    def chunk(c, h):
        if save:  # the state entering each chunk, for the backward
            hc_ref[c] = h.astype(hc_ref.dtype)
        t0 = c * L
        sl = pl.ds(t0, L)
        u = u_ref[:, sl].astype(acc)  # [BD, L]
        dt = dt_ref[:, sl].astype(acc) + bias[:, None]
        if softplus:
            dt = _softplus(dt)
        dt = jnp.where(lane + t0 < T, dt, 0.0)  # padding leaves h alone
        Bc = b_ref[:, sl].astype(acc)  # [N, L]
        Cc = c_ref[:, sl].astype(acc)
        du = dt * u
        rs = reset_ref[sl][None, :] if has_reset else None  # [1, L] int32

        def step(i, carry):
            h, ycols = carry
            col = lane == i  # [1, L]
            dt_i = jnp.sum(jnp.where(col, dt, 0.0), axis=1)  # [BD]
            du_i = jnp.sum(jnp.where(col, du, 0.0), axis=1)
            b_i = jnp.sum(jnp.where(col, Bc, 0.0), axis=1)  # [N]
            c_i = jnp.sum(jnp.where(col, Cc, 0.0), axis=1)
            if has_reset:
                h = _restart(h, jnp.sum(jnp.where(col, rs, 0), axis=1))
            h = jnp.exp(dt_i[:, None] * A) * h + du_i[:, None] * b_i[None, :]
            y_i = jnp.sum(h * c_i[None, :], axis=1)  # [BD]
            return h, jnp.where(col, y_i[:, None], ycols)

        h, y = lax.fori_loop(0, L, step, (h, jnp.zeros_like(u)))
        y = y + Dv[:, None] * u
        if has_z:
            y = y * _silu(z_ref[:, sl].astype(acc))
        y_ref[:, sl] = y.astype(y_ref.dtype)
        return h

    h = lax.fori_loop(0, n_chunks, chunk, h0_ref[...].astype(acc))
    ht_ref[...] = h.astype(ht_ref.dtype)


def _pad(x, shape):
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape, strict=True)])


def _sizes(u, A, B):
    """Groups, channels per group, channel tile, padded widths, chunk length, padded T."""
    Bt, Dc, T = u.shape
    G = 1 if B.ndim == 3 else B.shape[1]
    Dg = Dc // G
    BD = min(BLOCK_D, _pow2(Dg))
    L = min(CHUNK, _pow2(T))
    return G, Dg, BD, -(-Dg // BD) * BD, _pow2(A.shape[1]), L, -(-T // L) * L


def pad_reset(reset, Tp):
    """reset [T] (int32) -> [Tp], padded steps without a reset."""
    return jnp.pad(reset.astype(jnp.int32), (0, Tp - reset.shape[0]))


def _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, interpret, poison,
             save=False, reset=None):
    """Runs the kernel. Returns y [Bt, Dc, T] in u's dtype and h_T [Bt, Dc, N] (accumulation),
    and with ``save`` the padded states entering each chunk [Bt, G, chunks, Dgp, Np]."""
    Bt, Dc, T = u.shape
    N = A.shape[1]
    acc = _acc(u.dtype)
    G, Dg, BD, Dgp, Np, L, Tp = _sizes(u, A, B)

    def chan(x):  # [Bt, Dc, T] -> [Bt, G, Dgp, Tp]
        return _pad(x.reshape(Bt, G, Dg, T), (Bt, G, Dgp, Tp))

    def state(x):  # [Bt, N, T] or [Bt, G, N, T] -> [Bt, G, Np, Tp]
        x = x if x.ndim == 4 else x[:, None]
        return _pad(x, (Bt, G, Np, Tp))

    has_z = z is not None
    D = jnp.zeros((Dc,), acc) if D is None else D
    delta_bias = jnp.zeros((Dc,), acc) if delta_bias is None else delta_bias
    h0 = jnp.zeros((Bt, Dc, N), acc) if initial_state is None else initial_state
    args = [chan(u), chan(delta)] + ([chan(z)] if has_z else []) + [
        state(B), state(C),
        _pad(A.reshape(G, Dg, N), (G, Dgp, Np)),
        _pad(D.reshape(G, Dg), (G, Dgp)),
        _pad(delta_bias.reshape(G, Dg), (G, Dgp)),
        _pad(h0.reshape(Bt, G, Dg, N), (Bt, G, Dgp, Np)),
    ]
    sq = pl.squeezed
    seq = pl.BlockSpec((sq, sq, BD, Tp), lambda b, g, d: (b, g, d, 0))
    st = pl.BlockSpec((sq, sq, Np, Tp), lambda b, g, d: (b, g, 0, 0))
    in_specs = [seq, seq] + ([seq] if has_z else []) + [
        st, st,
        pl.BlockSpec((sq, BD, Np), lambda b, g, d: (g, d, 0)),
        pl.BlockSpec((sq, BD), lambda b, g, d: (g, d)),
        pl.BlockSpec((sq, BD), lambda b, g, d: (g, d)),
        pl.BlockSpec((sq, sq, BD, Np), lambda b, g, d: (b, g, d, 0)),
    ]
    has_reset = reset is not None
    if has_reset:
        args.append(pad_reset(reset, Tp))
        in_specs.append(pl.BlockSpec((Tp,), lambda b, g, d: (0,)))
    out_shape = (jax.ShapeDtypeStruct((Bt, G, Dgp, Tp), u.dtype),
                 jax.ShapeDtypeStruct((Bt, G, Dgp, Np), acc))
    out_specs = (seq, pl.BlockSpec((sq, sq, BD, Np), lambda b, g, d: (b, g, d, 0)))
    if save:
        out_shape += (jax.ShapeDtypeStruct((Bt, G, Tp // L, Dgp, Np), acc),)
        out_specs += (pl.BlockSpec((sq, sq, Tp // L, BD, Np), lambda b, g, d: (b, g, 0, d, 0)),)
    kernel = functools.partial(_scan_kernel, T=T, L=L, n_chunks=Tp // L, softplus=softplus,
                               has_z=has_z, acc=acc, save=save, has_reset=has_reset)
    aliases = {}
    if poison:
        # NaN-filled output buffers: any element the kernel fails to write stays NaN.
        n_in, n_out = len(args), len(out_shape)
        args += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs += list(out_specs)
        aliases = {n_in + i: i for i in range(n_out)}
        kernel = functools.partial(_skip_aliases, kernel, n_out)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(Bt, G, Dgp // BD), in_specs=in_specs,
        out_specs=out_specs, input_output_aliases=aliases, interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=4),  # the Triton lowering on GPUs
    )(*args)
    y = outs[0][:, :, :Dg, :T].reshape(Bt, Dc, T)
    hT = outs[1][:, :, :Dg, :N].reshape(Bt, Dc, N)
    return (y, hT, outs[2]) if save else (y, hT)


def _skip_aliases(kernel, n_out, *refs):
    # the aliased NaN inputs sit just before the outputs; the kernel never reads them
    kernel(*(refs[:-2 * n_out] + refs[-n_out:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _scan(u, delta, A, B, C, D, z, delta_bias, softplus, interpret, poison, initial_state,
          reset):
    return _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, interpret,
                    poison, reset=reset)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, interpret, poison, initial_state,
              reset):
    y, hT, hc = _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus,
                         interpret, poison, save=True, reset=reset)
    return (y, hT), (u, delta, A, B, C, D, z, delta_bias, initial_state, hc, reset)


def _scan_bwd(softplus, interpret, poison, res, g):
    from .selective_scan_bwd import backward

    *res, reset = res
    # the reset flags are integers: no cotangent
    return backward(*res, *g, softplus, interpret, poison, reset=reset) + (None,)


_scan.defvjp(_scan_fwd, _scan_bwd)


def _check_reset(reset, T):
    """``reset`` as an array [T] of bool or integer flags; a wrong one raises naming it."""
    if not hasattr(reset, "shape") or not hasattr(reset, "dtype"):
        raise ValueError(f"selective_scan: reset must be a bool array [T={T}], got "
                         f"{type(reset).__name__}")
    if tuple(reset.shape) != (T,):
        raise ValueError(f"selective_scan: reset must be a bool array [T={T}], got shape "
                         f"{tuple(reset.shape)}")
    if not (reset.dtype == jnp.bool_ or jnp.issubdtype(reset.dtype, jnp.integer)):
        raise ValueError(f"selective_scan: reset must be a bool (or integer) array [T={T}], "
                         f"got dtype {reset.dtype}")


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The shapes the kernel relies on; a wrong one raises naming the argument."""
    if u.ndim != 3 or u.shape[-1] == 0:
        raise ValueError(f"selective_scan: u must be [batch, channels, T] with T >= 1, got "
                         f"shape {tuple(u.shape)}")
    Bt, Dc, T = u.shape
    if A.ndim != 2 or A.shape[0] != Dc:
        raise ValueError(f"selective_scan: A must be [channels={Dc}, N], got {tuple(A.shape)}")
    N = A.shape[1]
    want = {"delta": (u.shape, delta), "z": (u.shape, z), "D": ((Dc,), D),
            "delta_bias": ((Dc,), delta_bias), "initial_state": ((Bt, Dc, N), initial_state)}
    for name, (shape, a) in want.items():
        if a is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"selective_scan: {name} must be {list(shape)}, got "
                             f"{tuple(a.shape)}")
    for name, M in (("B", B), ("C", C)):
        ok = (M.ndim == 3 and tuple(M.shape) == (Bt, N, T)) or (
            M.ndim == 4 and (M.shape[0], M.shape[2], M.shape[3]) == (Bt, N, T)
            and M.shape[1] >= 1 and Dc % M.shape[1] == 0)
        if not ok:
            raise ValueError(f"selective_scan: {name} must be [{Bt}, {N}, {T}] or [{Bt}, G, "
                             f"{N}, {T}] with G dividing {Dc}, got {tuple(M.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, *, reset=None, interpret=False,
                   poison=False):
    """mamba-ssm's ``selective_scan_fn`` plus an initial state, as a Pallas kernel.

    u, delta, z: [Bt, Dc, T]; A: [Dc, N]; B, C: [Bt, N, T] or [Bt, G, N, T]; D, delta_bias: [Dc];
    initial_state: [Bt, Dc, N]. Returns y [Bt, Dc, T] in u's dtype, and with
    ``return_final_state`` also h_T [Bt, Dc, N] in the accumulation dtype (float32, or float64
    for float64 inputs). ``reset`` (bool [T], packed rows; may be traced): the state restarts
    from zero where it is True, as if the sequence began there (a packed row's document
    starts; the same for every batch row), and no gradient crosses it.
    ``interpret`` runs the kernel in the Pallas interpreter (any device); ``poison`` hands the
    kernel NaN-filled output buffers (tests).
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if reset is not None:
        _check_reset(reset, u.shape[2])
        reset = jnp.asarray(reset).astype(jnp.int32)
    acc = _acc(u.dtype)
    h0 = (jnp.zeros((u.shape[0], u.shape[1], A.shape[1]), acc) if initial_state is None
          else initial_state)
    y, hT = _scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(interpret),
                  bool(poison), h0, reset)
    return (y, hT) if return_final_state else y


@functools.partial(jax.jit, static_argnums=(8, 10))
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False,
                       initial_state=None, return_final_state=False, reset=None):
    """The same scan in plain JAX, accumulating like the kernel: a ``lax.scan`` over chunks of
    CHUNK steps, each a rematerialised ``lax.scan`` over its steps, so a VJP keeps only the
    states at chunk boundaries. Grouped B and C stay [Bt, G, N] per step, never per channel.
    ``reset`` (bool [T]): the state restarts from zero there (selected, as in the kernel)."""
    Bt, Dc, T = u.shape
    N = A.shape[1]
    G = 1 if B.ndim == 3 else B.shape[1]
    Dg = Dc // G
    acc = _acc(u.dtype)
    dt = delta.astype(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(acc)[None, :, None]
    if softplus:
        dt = _softplus(dt)
    uu = u.astype(acc)
    L = CHUNK
    n = -(-T // L)

    def steps(x, per):  # [..., T] -> [n, L, ...] time-major; padded steps are zeros (dt = 0)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * L - T)])
        x = jnp.moveaxis(x.reshape(x.shape[:-1] + (n, L)), (-2, -1), (0, 1))
        return x.reshape((n, L) + per)

    def grouped(M):  # [Bt, N, T] | [Bt, G, N, T] -> [n, L, Bt, G, 1, N]
        M = M.astype(acc)
        M = M[:, None] if M.ndim == 3 else M
        return steps(M, (Bt, G, 1, N))

    h0 = (jnp.zeros((Bt, Dc, N), acc) if initial_state is None
          else initial_state.astype(acc)).reshape(Bt, G, Dg, N)
    Af = A.astype(acc).reshape(G, Dg, N)

    def step(h, xs):
        dt_t, du_t, b_t, c_t, r_t = xs  # [Bt, G, Dg], [Bt, G, Dg], [Bt, G, 1, N] x 2, []
        if r_t is not None:
            h = jnp.where(r_t, jnp.zeros((), h.dtype), h)
        h = jnp.exp(dt_t[..., None] * Af) * h + du_t[..., None] * b_t
        return h, jnp.sum(h * c_t, axis=-1)

    @jax.checkpoint
    def chunk(h, xs):
        return lax.scan(step, h, xs)

    rs = None if reset is None else steps(reset.astype(bool), ())  # padding: no reset
    xs = (steps(dt, (Bt, G, Dg)), steps(dt * uu, (Bt, G, Dg)), grouped(B), grouped(C), rs)
    hT, ys = lax.scan(chunk, h0, xs)  # ys [n, L, Bt, G, Dg]
    y = jnp.moveaxis(ys.reshape(n * L, Bt, Dc), 0, -1)[..., :T]
    if D is not None:
        y = y + D.astype(acc)[None, :, None] * uu
    if z is not None:
        y = y * _silu(z.astype(acc))
    y = y.astype(u.dtype)
    hT = hT.reshape(Bt, Dc, N)
    return (y, hT) if return_final_state else y
