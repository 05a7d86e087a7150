"""Backward of the Pallas selective scan: a reverse-time Pallas kernel.

One program per (batch, group, tile of BD channels), as in the forward. It walks the chunks
from last to first, starting from the state the forward saved at each chunk's entry, and inside
a chunk walks the steps backwards; the state before step l is recomputed by stepping from the
chunk's entry (O(L^2) steps per chunk, no per-step states stored). Per step, with
a = exp(dt A), gyo = gy * silu(z):

    dh += gyo C_t;  dC_t = sum_d gyo h_t;  dB_t = sum_d dh dt u;  dA += dh h_{t-1} a dt
    ddt = sum_n dh (h_{t-1} a A + u B_t);  du = gyo D + sum_n dh B_t dt;  dh <- dh a

B, C, A, D and delta_bias gradients are per-program partial sums, added up outside. Padded time
steps have dt = 0 and gy = 0, so they contribute nothing. With ``reset`` (packed rows) the state
before a reset step is zero in the recomputation (h_{t-1} selected away, so dA and ddt get no
term of it), and the adjoint leaving that step backwards is zero: nothing reaches the previous
document, selected with ``where`` so that a non-finite adjoint stays where it is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from .selective_scan import _acc, _pad, _restart, _silu, _sizes, _softplus, pad_reset


def _sigmoid(x):
    e = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _bwd_kernel(*refs, T, L, n_chunks, softplus, has_z, acc, has_reset=False):
    n_in = 10 + has_z + has_reset
    ins = list(refs[:n_in])
    reset_ref = ins.pop() if has_reset else None
    u_ref, dl_ref = ins[:2]
    z_ref = ins[2] if has_z else None
    b_ref, c_ref, a_ref, d_ref, bias_ref, hc_ref, gy_ref, gh_ref = ins[-8:]
    outs = list(refs[n_in:])
    du_ref, ddl_ref = outs[:2]
    dz_ref = outs[2] if has_z else None
    db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dh0_ref = outs[-6:]
    A = a_ref[...].astype(acc)  # [BD, N]
    Dv = d_ref[...].astype(acc)  # [BD]
    bias = bias_ref[...].astype(acc)
    lane = lax.broadcasted_iota(jnp.int32, (1, L), 1)

    def col(x, i):  # column i of [R, L] -> [R]
        return jnp.sum(jnp.where(lane == i, x, 0.0), axis=1)

    def flag(rs, i):  # the reset flag of step i, int32 [1]
        return jnp.sum(jnp.where(lane == i, rs, 0), axis=1)

    def chunk(cc, carry):
        dh, dA, dD, dbias = carry
        c = n_chunks - 1 - cc
        t0 = c * L
        sl = pl.ds(t0, L)
        u = u_ref[:, sl].astype(acc)
        pre = dl_ref[:, sl].astype(acc) + bias[:, None]
        live = lane + t0 < T
        dt = jnp.where(live, _softplus(pre) if softplus else pre, 0.0)
        Bc = b_ref[:, sl].astype(acc)
        Cc = c_ref[:, sl].astype(acc)
        gy = gy_ref[:, sl].astype(acc)
        if has_z:
            zc = z_ref[:, sl].astype(acc)
            sz = _silu(zc)
        else:
            sz = jnp.ones_like(u)
        h_in = hc_ref[c].astype(acc)  # [BD, N] entering the chunk
        rs = reset_ref[sl][None, :] if has_reset else None  # [1, L] int32

        def fwd_step(i, h):
            if has_reset:
                h = _restart(h, flag(rs, i))
            return (jnp.exp(col(dt, i)[:, None] * A) * h
                    + (col(dt, i) * col(u, i))[:, None] * col(Bc, i)[None, :])

        def step(ll, carry):
            dh, dA, dD, cols = carry
            du_c, ddt_c, dz_c, db_c, dc_c = cols
            i = L - 1 - ll
            h_prev = lax.fori_loop(0, i, fwd_step, h_in)
            if has_reset:  # the state step i starts from
                r_i = flag(rs, i)
                h_prev = _restart(h_prev, r_i)
            dt_i, u_i, b_i, c_i = col(dt, i), col(u, i), col(Bc, i), col(Cc, i)
            a_i = jnp.exp(dt_i[:, None] * A)
            h_i = a_i * h_prev + (dt_i * u_i)[:, None] * b_i[None, :]
            gy_i, sz_i = col(gy, i), col(sz, i)
            gyo = gy_i * sz_i
            if has_z:
                z_i = col(zc, i)
                ypre = jnp.sum(h_i * c_i[None, :], axis=1) + Dv * u_i
                sg = _sigmoid(z_i)
                dz_i = gy_i * ypre * sg * (1.0 + z_i * (1.0 - sg))
            else:
                dz_i = jnp.zeros_like(gy_i)
            dD = dD + gyo * u_i
            dh = dh + gyo[:, None] * c_i[None, :]
            dc_i = jnp.sum(gyo[:, None] * h_i, axis=0)  # [N]
            t1 = dh * h_prev * a_i
            dhb = jnp.sum(dh * b_i[None, :], axis=1)  # [BD]
            ddt_i = jnp.sum(t1 * A, axis=1) + dhb * u_i
            dA = dA + t1 * dt_i[:, None]
            du_i = gyo * Dv + dhb * dt_i
            db_i = jnp.sum(dh * (dt_i * u_i)[:, None], axis=0)  # [N]
            dh = dh * a_i
            if has_reset:  # nothing flows into the previous document
                dh = _restart(dh, r_i)
            at = lane == i
            cols = (jnp.where(at, du_i[:, None], du_c), jnp.where(at, ddt_i[:, None], ddt_c),
                    jnp.where(at, dz_i[:, None], dz_c), jnp.where(at, db_i[:, None], db_c),
                    jnp.where(at, dc_i[:, None], dc_c))
            return dh, dA, dD, cols

        zeros_d, zeros_n = jnp.zeros_like(u), jnp.zeros_like(Bc)
        dh, dA, dD, cols = lax.fori_loop(
            0, L, step, (dh, dA, dD, (zeros_d, zeros_d, zeros_d, zeros_n, zeros_n)))
        du_c, ddt_c, dz_c, db_c, dc_c = cols
        ddl = jnp.where(live, ddt_c * (_sigmoid(pre) if softplus else 1.0), 0.0)
        du_ref[:, sl] = du_c.astype(du_ref.dtype)
        ddl_ref[:, sl] = ddl.astype(ddl_ref.dtype)
        if has_z:
            dz_ref[:, sl] = dz_c.astype(dz_ref.dtype)
        db_ref[:, sl] = db_c.astype(db_ref.dtype)
        dc_ref[:, sl] = dc_c.astype(dc_ref.dtype)
        return dh, dA, dD, dbias + jnp.sum(ddl, axis=1)

    dh, dA, dD, dbias = lax.fori_loop(
        0, n_chunks, chunk, (gh_ref[...].astype(acc), jnp.zeros_like(A), jnp.zeros_like(Dv),
                             jnp.zeros_like(bias)))
    dh0_ref[...] = dh.astype(dh0_ref.dtype)
    da_ref[...] = dA.astype(da_ref.dtype)
    dd_ref[...] = dD.astype(dd_ref.dtype)
    dbias_ref[...] = dbias.astype(dbias_ref.dtype)


def backward(u, delta, A, B, C, D, z, delta_bias, h0, hc, gy, gh, softplus, interpret, poison,
             reset=None):
    """Cotangents of (u, delta, A, B, C, D, z, delta_bias, initial_state) given those of
    (y, h_T); ``hc`` holds the states entering each chunk, saved by the forward kernel;
    ``reset``: the forward's restart flags (int32 [T]) or None."""
    Bt, Dc, T = u.shape
    N = A.shape[1]
    acc = _acc(u.dtype)
    G, Dg, BD, Dgp, Np, L, Tp = _sizes(u, A, B)
    nD = Dgp // BD
    has_z = z is not None

    def chan(x):
        return _pad(x.reshape(Bt, G, Dg, T), (Bt, G, Dgp, Tp))

    def state(x):
        x = x if x.ndim == 4 else x[:, None]
        return _pad(x, (Bt, G, Np, Tp))

    Dz = jnp.zeros((Dc,), acc) if D is None else D
    bz = jnp.zeros((Dc,), acc) if delta_bias is None else delta_bias
    args = [chan(u), chan(delta)] + ([chan(z)] if has_z else []) + [
        state(B), state(C), _pad(A.reshape(G, Dg, N), (G, Dgp, Np)),
        _pad(Dz.reshape(G, Dg), (G, Dgp)), _pad(bz.reshape(G, Dg), (G, Dgp)), hc,
        chan(gy), _pad(gh.astype(acc).reshape(Bt, G, Dg, N), (Bt, G, Dgp, Np))]
    sq = pl.squeezed
    seq = pl.BlockSpec((sq, sq, BD, Tp), lambda b, g, d: (b, g, d, 0))
    st = pl.BlockSpec((sq, sq, Np, Tp), lambda b, g, d: (b, g, 0, 0))
    tile = pl.BlockSpec((sq, sq, BD, Np), lambda b, g, d: (b, g, d, 0))
    vec = pl.BlockSpec((sq, sq, BD), lambda b, g, d: (b, g, d))
    in_specs = [seq, seq] + ([seq] if has_z else []) + [
        st, st, pl.BlockSpec((sq, BD, Np), lambda b, g, d: (g, d, 0)),
        pl.BlockSpec((sq, BD), lambda b, g, d: (g, d)),
        pl.BlockSpec((sq, BD), lambda b, g, d: (g, d)),
        pl.BlockSpec((sq, sq, Tp // L, BD, Np), lambda b, g, d: (b, g, 0, d, 0)),
        seq, tile]
    has_reset = reset is not None
    if has_reset:
        args.append(pad_reset(reset, Tp))
        in_specs.append(pl.BlockSpec((Tp,), lambda b, g, d: (0,)))
    part = pl.BlockSpec((sq, sq, sq, Np, Tp), lambda b, g, d: (b, g, d, 0, 0))
    f = jax.ShapeDtypeStruct
    out_shape = [f((Bt, G, Dgp, Tp), acc)] * (3 if has_z else 2) + [
        f((Bt, G, nD, Np, Tp), acc), f((Bt, G, nD, Np, Tp), acc), f((Bt, G, Dgp, Np), acc),
        f((Bt, G, Dgp), acc), f((Bt, G, Dgp), acc), f((Bt, G, Dgp, Np), acc)]
    out_specs = [seq] * (3 if has_z else 2) + [part, part, tile, vec, vec, tile]
    kernel = functools.partial(_bwd_kernel, T=T, L=L, n_chunks=Tp // L, softplus=softplus,
                               has_z=has_z, acc=acc, has_reset=has_reset)
    aliases = {}
    if poison:
        # NaN-filled output buffers: any element the kernel fails to write stays NaN
        n_in, n_out = len(args), len(out_shape)
        args += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs += out_specs
        aliases = {n_in + i: i for i in range(n_out)}
        inner = kernel

        def kernel(*refs):
            inner(*(refs[:-2 * n_out] + refs[-n_out:]))
    outs = list(pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=(Bt, G, nD), in_specs=in_specs,
        out_specs=tuple(out_specs), input_output_aliases=aliases, interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=4),  # the Triton lowering on GPUs
    )(*args))

    def unchan(x, like):
        return x[:, :, :Dg, :T].reshape(Bt, Dc, T).astype(like.dtype)

    def unstate(x, like):
        x = jnp.sum(x, axis=2)[:, :, :N, :T]  # partial sums over channel tiles
        return (x[:, 0] if like.ndim == 3 else x).astype(like.dtype)

    du, ddl = unchan(outs[0], u), unchan(outs[1], delta)
    dz = unchan(outs[2], z) if has_z else None
    dB, dC, dA, dD, dbias, dh0 = outs[-6:]
    dA = jnp.sum(dA, axis=0)[:, :Dg, :N].reshape(Dc, N).astype(A.dtype)
    dD = None if D is None else jnp.sum(dD, axis=0)[:, :Dg].reshape(Dc).astype(D.dtype)
    dbias = (None if delta_bias is None
             else jnp.sum(dbias, axis=0)[:, :Dg].reshape(Dc).astype(delta_bias.dtype))
    dh0 = dh0[:, :, :Dg, :N].reshape(Bt, Dc, N).astype(h0.dtype)
    return du, ddl, dA, unstate(dB, B), unstate(dC, C), dD, dz, dbias, dh0


def backward_ref(u, delta, A, B, C, D, z, delta_bias, h0, gy, gh, softplus, reset=None):
    """The same cotangents from the VJP of the plain-JAX ``selective_scan_ref``."""
    from .selective_scan import selective_scan_ref

    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, softplus, h0, True,
                                  reset)

    _, vjp = jax.vjp(f, u, delta, A, B, C, D, z, delta_bias, h0)
    return vjp((gy, gh.astype(_acc(u.dtype))))
