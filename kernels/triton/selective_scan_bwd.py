"""Backward kernel of the chunked selective scan (``selective_scan``, which launches it).

Per (batch row, block of channels) the chunks are walked in reverse: h_{t-1} is rebuilt from
the chunk's saved entering state with a scan of the steps shifted by one, the adjoint
``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` comes from a suffix scan, and ``exp(dt A) g`` at
the chunk's first step carries into the chunk before. dB and dC are written as partial sums per
block of channels, dA, dD and d(delta_bias) per batch row; the launcher adds them up.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .affine_scan import combine as _combine
from .affine_scan import restart_combine as _restart_combine
from .affine_scan import restart_suffix_scan as _restart_suffix_scan
from .affine_scan import suffix_scan as _suffix_scan
from .selective_scan import _block, _ckpt_offsets, _load_c, _load_reset, _sigmoid, _step_tiles


@triton.jit
def _scan_bwd_kernel(
    u, delta, A, Bm, Cm, Dv, z, bias, dy, dhT, ckpt, reset,
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part, dh0,
    T, Dc, N, G, NCHUNK, NDB,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_RESET: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr,
):
    pid_b, pid_d, d, n, n_ok, row, bc_row, state, dn_ok, a_mat, d_vec, b_vec = _block(
        A, Dv, bias, T, Dc, N, G, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, ACC)
    i = tl.arange(0, CHUNK)
    part_row = ((pid_b * NDB + pid_d) * N + n) * T  # [B, NDB, N, T] partial sums over channels
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)  # dL/dh at the chunk's last step, from later
    if HAS_DHT:
        carry = tl.load(dhT + state, mask=dn_ok, other=0.0).to(ACC)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    dD_acc = tl.zeros([BLOCK_D], dtype=ACC)
    dbias_acc = tl.zeros([BLOCK_D], dtype=ACC)
    for cc in range(0, NCHUNK):
        c = NCHUNK - 1 - cc
        h_in = tl.load(ckpt + _ckpt_offsets(pid_b, d, n, c, Dc, N, NCHUNK), mask=dn_ok,
                       other=0.0).to(ACC)
        t = c * CHUNK + i
        a, b, dt, raw, u_t, b_t, ok = _step_tiles(u, delta, Bm, a_mat, b_vec, row, bc_row, n_ok,
                                                  t, T, HAS_BIAS, SOFTPLUS, ACC)
        # h_{t-1}: a scan of the steps shifted by one, the chunk's first column the identity
        a_p, b_p, _, _, _, _, _ = _step_tiles(u, delta, Bm, a_mat, b_vec, row, bc_row, n_ok,
                                              tl.where(i == 0, -1, t - 1), T, HAS_BIAS,
                                              SOFTPLUS, ACC)
        if HAS_RESET:
            # restarts up to t - 1 cut the rebuilt state; one at t makes h_{t-1} zero
            f_p = _load_reset(reset, tl.where(i == 0, -1, t - 1), T, BLOCK_D, BLOCK_N, CHUNK,
                              ACC)
            ap_cum, bp_cum, fp_cum = tl.associative_scan((a_p, b_p, f_p), 2, _restart_combine)
            h_prev = tl.where(fp_cum > 0, bp_cum, ap_cum * h_in[:, :, None] + bp_cum)
            f_t = _load_reset(reset, t, T, BLOCK_D, BLOCK_N, CHUNK, ACC)
            h_prev = tl.where(f_t > 0, 0.0, h_prev)
        else:
            ap_cum, bp_cum = tl.associative_scan((a_p, b_p), 2, _combine)
            h_prev = ap_cum * h_in[:, :, None] + bp_cum
        hs = a * h_prev + b
        c_t = _load_c(Cm, bc_row, n_ok, t, T, ACC)
        dy_t = tl.load(dy + row[:, None] + t[None, :], mask=ok, other=0.0).to(ACC)
        dyr = dy_t
        if HAS_Z:
            z_t = tl.load(z + row[:, None] + t[None, :], mask=ok, other=0.0).to(ACC)
            sz = _sigmoid(z_t)
            yr = tl.sum(hs * c_t[None, :, :], axis=1) + d_vec[:, None] * u_t
            tl.store(dz + row[:, None] + t[None, :], dy_t * yr * sz * (1.0 + z_t * (1.0 - sz)),
                     mask=ok)
            dyr = dy_t * z_t * sz
        # g_t = dL/dh_t = C_t dyr_t + a_{t+1} g_{t+1}: a suffix scan with the decays of the
        # next steps (the chunk's last column gets the identity and the carry instead)
        a_n, _, _, _, _, _, _ = _step_tiles(u, delta, Bm, a_mat, b_vec, row, bc_row, n_ok,
                                            tl.where(i == CHUNK - 1, -1, t + 1), T, HAS_BIAS,
                                            SOFTPLUS, ACC)
        if HAS_RESET:  # a restart at t + 1 passes nothing back to t
            f_n = _load_reset(reset, tl.where(i == CHUNK - 1, -1, t + 1), T, BLOCK_D, BLOCK_N,
                              CHUNK, ACC)
            an_cum, g_in, fn_cum = _restart_suffix_scan(a_n, dyr[:, None, :] * c_t[None, :, :],
                                                        f_n, 2)
            gs = tl.where(fn_cum > 0, g_in, g_in + an_cum * carry[:, :, None])
        else:
            an_cum, g_in = _suffix_scan(a_n, dyr[:, None, :] * c_t[None, :, :], 2)
            gs = g_in + an_cum * carry[:, :, None]  # [BD, BN, BT]
        tl.store(dC_part + part_row[:, None] + t[None, :],
                 tl.sum(dyr[:, None, :] * hs, axis=0), mask=n_ok[:, None] & (t < T)[None, :])
        tl.store(dB_part + part_row[:, None] + t[None, :],
                 tl.sum(gs * (dt * u_t)[:, None, :], axis=0),
                 mask=n_ok[:, None] & (t < T)[None, :])
        dD_acc += tl.sum(dyr * u_t, axis=1)
        gb = tl.sum(gs * b_t[None, :, :], axis=1)  # [BD, BT]
        du_t = dyr * d_vec[:, None] + dt * gb
        da = gs * h_prev * a  # dL/d(dt A) elementwise
        ddt = u_t * gb + tl.sum(da * a_mat[:, :, None], axis=1)
        dA_acc += tl.sum(da * dt[:, None, :], axis=2)
        if SOFTPLUS:
            ddt = ddt * _sigmoid(raw)
        ddt = tl.where(ok, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du + row[:, None] + t[None, :], du_t, mask=ok)
        tl.store(ddelta + row[:, None] + t[None, :], ddt, mask=ok)
        # dL/dh entering the chunk = a_first g_first (0 where the chunk starts a document)
        first = a * gs
        if HAS_RESET:
            first = tl.where(f_t > 0, 0.0, first)
        carry = tl.sum(tl.where((i == 0)[None, None, :], first, 0.0), axis=2)
    tl.store(dh0 + state, carry, mask=dn_ok)
    tl.store(dA_part + state, dA_acc, mask=dn_ok)  # [B, Dc, N]
    tl.store(dD_part + pid_b * Dc + d, dD_acc, mask=d < Dc)
    tl.store(dbias_part + pid_b * Dc + d, dbias_acc, mask=d < Dc)
