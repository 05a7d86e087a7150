"""Chunked selective scan (DESIGN 2.1), forward and backward, in Triton.

Semantics of mamba-ssm's ``selective_scan_fn`` plus an initial state in and the final state out:

    dt_t = softplus(delta_t + delta_bias)   (softplus only if delta_softplus)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t u_t B_t        h: [B, Dc, N], accumulated in float32
    y_t  = C_t . h_t + D u_t,  times silu(z_t) if z is given

One program owns a block of channels of one batch row and walks the sequence chunk by chunk.
A chunk is loaded as [channels, time] tiles (contiguous along time) and scanned in closed form
with ``tl.associative_scan`` over the pairs (exp(dt A), dt u B) of ``h = a h + b``; the state
carries from chunk to chunk in float32. The forward saves the state entering every chunk; the
backward walks the chunks in reverse, rebuilds h_{t-1} from the chunk's saved state with a
shifted scan, and gets ``g_t = dL/dh_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` from a suffix
scan, carrying ``exp(dt A) g`` into the chunk before. Gradients reach u, delta, A, B, C, D, z,
delta_bias and the initial state, and flow in from the final state.

Gradients of B and C (shared by the channels of a group) are summed over the block's channels
inside the program and over blocks afterwards, so no atomics are needed: a block never spans
two groups because its width divides the group width. The backward kernel is in
``selective_scan_bwd``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .affine_scan import combine as _combine
from .affine_scan import restart_combine as _restart_combine
from .buffers import acc_dtype, check_device, check_float, empty, tl_acc

CHUNK = 32  # time steps per tile, and between saved states
MAX_BLOCK_D = 8  # a program holds [BLOCK_D, N, chunk] tiles
# Most channels x states a program holds in its [BLOCK_D, BLOCK_N, CHUNK] tiles. Compiled for
# sm_90, wider tiles spill registers: at d_state 64 with 8 channels the forward kernel keeps
# 1.1 KB of stack per thread and the backward 7.8 KB; 8 x 16 keeps 16 bytes. Narrower blocks
# cost memory instead: the backward's partial sums of dB and dC are [B, Dc / BLOCK_D, N, T].
MAX_TILE = 128


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), with log1p's small-argument series where log(1 + e) rounds.
    e = tl.exp(-tl.abs(x))
    lp = tl.where(e < 1e-6, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.maximum(x, 0.0) + lp


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_dt(delta, bias_d, off, valid, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
             ACC: tl.constexpr):
    """Returns (dt after bias and softplus, pre-softplus value); 0 where not valid."""
    raw = tl.load(delta + off, mask=valid, other=0.0).to(ACC)
    if HAS_BIAS:
        raw = raw + bias_d
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    # Padding steps must leave the state alone: dt = 0 makes the step the identity.
    return tl.where(valid, dt, 0.0), raw


@triton.jit
def _step_tiles(u, delta, Bm, A_mat, b_vec, row, bc_row, n_ok, t, T, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """The steps at times t [BT] (one per column) as tiles: decay a = exp(dt A) and input
    b = dt u B [BD, BN, BT], with dt and u [BD, BT]. Steps outside [0, T) are the identity."""
    ok_t = (t >= 0) & (t < T)
    ok = (row[:, None] * 0 + t[None, :] >= 0) & (row[:, None] * 0 + t[None, :] < T)
    dt, raw = _load_dt(delta, b_vec[:, None], row[:, None] + t[None, :], ok, HAS_BIAS,
                       SOFTPLUS, ACC)
    u_t = tl.load(u + row[:, None] + t[None, :], mask=ok, other=0.0).to(ACC)
    b_t = tl.load(Bm + bc_row[:, None] + t[None, :], mask=n_ok[:, None] & ok_t[None, :],
                  other=0.0).to(ACC)
    a = tl.exp(dt[:, None, :] * A_mat[:, :, None])
    b = (dt * u_t)[:, None, :] * b_t[None, :, :]
    return a, b, dt, raw, u_t, b_t, ok


@triton.jit
def _block(A, Dv, bias, T, Dc, N, G, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Program (batch row pid_b, block of channels pid_d): the channels d [BD], the states n
    [BN] and their mask, where each channel's sequence starts (row [BD]) and its group's B and
    C (bc_row [BN]), offsets into [B, Dc, N] (state [BD, BN]) and their mask, A [BD, BN], D and
    delta_bias [BD] (0 when not given)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    g = (pid_d * BLOCK_D) // (Dc // G)  # the block's group
    row = (pid_b * Dc + d) * T
    bc_row = ((pid_b * G + g) * N + n) * T
    dn = d[:, None] * N + n[None, :]
    dn_ok = n_ok[None, :] & (d[:, None] < Dc)
    a_mat = tl.load(A + dn, mask=dn_ok, other=0.0).to(ACC)
    d_vec = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_D:
        d_vec = tl.load(Dv + d).to(ACC)
    b_vec = tl.zeros([BLOCK_D], dtype=ACC)
    if HAS_BIAS:
        b_vec = tl.load(bias + d).to(ACC)
    return pid_b, pid_d, d, n, n_ok, row, bc_row, pid_b * Dc * N + dn, dn_ok, a_mat, d_vec, b_vec


@triton.jit
def _ckpt_offsets(pid_b, d, n, c, Dc, N, NCHUNK):
    """Where the state entering chunk c sits in the saved states [B, Dc, NCHUNK, N]."""
    return (pid_b * Dc + d[:, None]) * NCHUNK * N + c * N + n[None, :]


@triton.jit
def _load_c(Cm, bc_row, n_ok, t, T, ACC: tl.constexpr):
    """C at times t as a [BN, BT] tile."""
    return tl.load(Cm + bc_row[:, None] + t[None, :], mask=n_ok[:, None] & (t < T)[None, :],
                   other=0.0).to(ACC)


@triton.jit
def _load_reset(reset, t, T, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                CHUNK: tl.constexpr, ACC: tl.constexpr):
    """Restart flags (1 where a packed row's document starts) at times t [BT], as a
    [BD, BN, BT] tile; 0 outside [0, T)."""
    r = tl.load(reset + t, mask=(t >= 0) & (t < T), other=0).to(ACC)
    return tl.broadcast_to(r[None, None, :], (BLOCK_D, BLOCK_N, CHUNK))


@triton.jit
def _scan_fwd_kernel(
    u, delta, A, Bm, Cm, Dv, z, bias, h0, reset, y, hT, ckpt,
    T, Dc, N, G, NCHUNK,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr,
):
    pid_b, _pid_d, d, n, n_ok, row, bc_row, state, dn_ok, a_mat, d_vec, b_vec = _block(
        A, Dv, bias, T, Dc, N, G, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, ACC)
    i = tl.arange(0, CHUNK)  # [BT]
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=ACC)
    if HAS_H0:
        h = tl.load(h0 + state, mask=dn_ok, other=0.0).to(ACC)
    for c in range(0, NCHUNK):
        tl.store(ckpt + _ckpt_offsets(pid_b, d, n, c, Dc, N, NCHUNK), h, mask=dn_ok)
        t = c * CHUNK + i
        a, b, dt, _, u_t, _, ok = _step_tiles(u, delta, Bm, a_mat, b_vec, row, bc_row, n_ok, t,
                                              T, HAS_BIAS, SOFTPLUS, ACC)
        if HAS_RESET:  # a restart drops the state before it (selected, never times zero)
            f = _load_reset(reset, t, T, BLOCK_D, BLOCK_N, CHUNK, ACC)
            a_cum, b_cum, f_cum = tl.associative_scan((a, b, f), 2, _restart_combine)
            hs = tl.where(f_cum > 0, b_cum, a_cum * h[:, :, None] + b_cum)
        else:
            a_cum, b_cum = tl.associative_scan((a, b), 2, _combine)
            hs = a_cum * h[:, :, None] + b_cum  # [BD, BN, BT]
        c_t = _load_c(Cm, bc_row, n_ok, t, T, ACC)
        out = tl.sum(hs * c_t[None, :, :], axis=1) + d_vec[:, None] * u_t  # [BD, BT]
        if HAS_Z:
            z_t = tl.load(z + row[:, None] + t[None, :], mask=ok, other=0.0).to(ACC)
            out = out * z_t * _sigmoid(z_t)
        tl.store(y + row[:, None] + t[None, :], out.to(y.dtype.element_ty), mask=ok)
        # padding steps are the identity, so the last column is the state after the chunk
        h = tl.sum(tl.where((i == CHUNK - 1)[None, None, :], hs, 0.0), axis=2)
    tl.store(hT + state, h, mask=dn_ok)


def _block_d(Dc: int, G: int, block_n: int, tile: int) -> int:
    """The widest power of two <= MAX_BLOCK_D dividing the group width, with at most ``tile``
    channels x states per program, so a block of channels never straddles two groups and
    needs no channel mask."""
    width = Dc // G
    bd = 1
    while (bd * 2 <= MAX_BLOCK_D and bd * 2 * block_n <= tile and width % (bd * 2) == 0):
        bd *= 2
    return bd


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The dtypes, devices and shapes the kernels index memory by, for a direct call; the torch
    backend checks the arguments with ``memcore.spec.validate`` before it calls the kernel."""
    where = "selective_scan"
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_float(where, name, t)
    for name, t in (("D", D), ("z", z), ("delta_bias", delta_bias),
                    ("initial_state", initial_state)):
        if t is not None:
            check_float(where, name, t)
    check_device(where, u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                 initial_state=initial_state)
    if u.ndim != 3:
        raise ValueError(f"{where}: u must be [batch, channels, T], got shape {tuple(u.shape)}")
    Bt, Dc, T = u.shape
    if A.ndim != 2 or A.shape[0] != Dc:
        raise ValueError(f"{where}: A must be [channels={Dc}, d_state], got {tuple(A.shape)}")
    N = A.shape[1]
    if B.ndim == 4 and (B.shape[1] == 0 or Dc % B.shape[1]):
        raise ValueError(f"{where}: B must be [batch, groups dividing {Dc}, d_state, T], got "
                         f"{tuple(B.shape)}")
    bc = (Bt, N, T) if B.ndim != 4 else (Bt, B.shape[1], N, T)  # C follows B's group layout
    shapes = {"delta": (delta, (Bt, Dc, T)), "z": (z, (Bt, Dc, T)), "B": (B, bc), "C": (C, bc),
              "D": (D, (Dc,)), "delta_bias": (delta_bias, (Dc,)),
              "initial_state": (initial_state, (Bt, Dc, N))}
    for name, (t, shape) in shapes.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must be of shape {shape}, got {tuple(t.shape)}")


def _c(t):
    return None if t is None else t.contiguous()


def _grouped(m):
    return m if m.ndim == 4 else m[:, None]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, chunk, reset):
        u, delta, A, D, z, delta_bias, h0 = map(_c, (u, delta, A, D, z, delta_bias, h0))
        Bg, Cg = _grouped(B).contiguous(), _grouped(C).contiguous()
        Bt, Dc, T = u.shape
        N, G = A.shape[1], Bg.shape[1]
        acc = acc_dtype(u.dtype)
        bn = triton.next_power_of_2(N)
        bd = _block_d(Dc, G, bn, MAX_TILE)
        nchunk = triton.cdiv(T, chunk)
        ctx.chunk = chunk
        y = empty((Bt, Dc, T), u.dtype, u.device)
        hT = empty((Bt, Dc, N), acc, u.device)
        ckpt = empty((Bt, Dc, nchunk, N), acc, u.device)
        dummy = u
        _scan_fwd_kernel[(Bt, Dc // bd)](
            u, delta, A, Bg, Cg, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
            reset if reset is not None else dummy, y, hT, ckpt, T, Dc, N, G, nchunk,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(softplus), HAS_H0=h0 is not None, HAS_RESET=reset is not None,
            BLOCK_D=bd, BLOCK_N=bn, CHUNK=chunk, ACC=tl_acc(u.dtype),
        )
        ctx.reset = reset
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, ckpt)
        ctx.plain_bc = B.ndim == 3
        ctx.softplus = bool(softplus)
        ctx.dtypes = (B.dtype, C.dtype, h0.dtype if h0 is not None else None)
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        # imported here: the backward kernel uses this module's tile helpers
        from .selective_scan_bwd import _scan_bwd_kernel

        u, delta, A, Bg, Cg, D, z, delta_bias, ckpt = ctx.saved_tensors
        Bt, Dc, T = u.shape
        N, G = A.shape[1], Bg.shape[1]
        acc = acc_dtype(u.dtype)
        dev = u.device
        bn = triton.next_power_of_2(N)
        bd = _block_d(Dc, G, bn, MAX_TILE)
        ndb = Dc // bd
        nchunk = ckpt.shape[2]
        dy = torch.zeros_like(u) if dy is None else dy.contiguous()
        du = empty((Bt, Dc, T), acc, dev)
        ddelta = empty((Bt, Dc, T), acc, dev)
        dz = empty((Bt, Dc, T), acc, dev) if z is not None else None
        dA_part = empty((Bt, Dc, N), acc, dev)
        dB_part = empty((Bt, ndb, N, T), acc, dev)
        dC_part = empty((Bt, ndb, N, T), acc, dev)
        dD_part = empty((Bt, Dc), acc, dev)
        dbias_part = empty((Bt, Dc), acc, dev)
        dh0 = empty((Bt, Dc, N), acc, dev)
        dummy = u
        _scan_bwd_kernel[(Bt, ndb)](
            u, delta, A, Bg, Cg, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, dy,
            dhT.contiguous() if dhT is not None else dummy, ckpt,
            ctx.reset if ctx.reset is not None else dummy,
            du, ddelta, dz if dz is not None else du, dA_part, dB_part, dC_part, dD_part,
            dbias_part, dh0, T, Dc, N, G, nchunk, ndb,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus, HAS_DHT=dhT is not None, HAS_RESET=ctx.reset is not None,
            BLOCK_D=bd, BLOCK_N=bn, CHUNK=ctx.chunk, ACC=tl_acc(u.dtype),
        )

        def group_sum(part, dtype):
            g = part.reshape(Bt, G, ndb // G, N, T).sum(2)
            return (g[:, 0] if ctx.plain_bc else g).to(dtype)

        need = ctx.needs_input_grad
        b_dtype, c_dtype, h0_dtype = ctx.dtypes
        return (
            du.to(u.dtype) if need[0] else None,
            ddelta.to(delta.dtype) if need[1] else None,
            dA_part.sum(0).to(A.dtype) if need[2] else None,
            group_sum(dB_part, b_dtype) if need[3] else None,
            group_sum(dC_part, c_dtype) if need[4] else None,
            dD_part.sum(0).to(D.dtype) if D is not None and need[5] else None,
            dz.to(z.dtype) if z is not None and need[6] else None,
            dbias_part.sum(0).to(delta_bias.dtype)
            if delta_bias is not None and need[7] else None,
            dh0.to(h0_dtype) if h0_dtype is not None and need[8] else None,
            None,
            None,
            None,
        )


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, chunk=CHUNK, reset=None):
    """mamba-ssm's ``selective_scan_fn`` with an initial state, as a Triton kernel.

    u, delta, z: [Bt, Dc, T]; A: [Dc, N] (real); B, C: [Bt, N, T] or [Bt, G, N, T];
    D, delta_bias: [Dc]; initial_state: [Bt, Dc, N] (zeros if None). Returns y [Bt, Dc, T] in
    u's dtype and, with ``return_final_state``, h_T [Bt, Dc, N] in float32 (float64 for float64
    input). Differentiable in every tensor argument, including through h_T.
    ``chunk`` (a power of two) is the tile length along time and the spacing of saved states;
    the result does not depend on it, memory and register use do.
    ``reset`` (bool [T], packed rows): the state restarts from zero where it is True, as if
    the sequence began there (a packed row's document starts; the same for every batch row).
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"selective_scan: chunk must be a power of two, got {chunk!r}")
    if reset is not None:
        if reset.ndim != 1 or reset.shape[0] != u.shape[2] or reset.device != u.device:
            raise ValueError(f"selective_scan: reset must be [T={u.shape[2]}] on {u.device}, "
                             f"got shape {tuple(reset.shape)} on {reset.device}")
        reset = reset.to(torch.int8).contiguous()
    y, hT = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                 delta_softplus, chunk, reset)
    return (y, hT) if return_final_state else y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, initial_state=None, return_final_state=False,
                       reset=None):
    """The same function as a plain torch loop over time (float32 or float64 accumulation);
    ``reset`` [T]: the state restarts from zero there."""
    acc = acc_dtype(u.dtype)
    Bt, Dc, T = u.shape
    u_, dt, A_ = u.to(acc), delta.to(acc), A.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[None, :, None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    Bx, Cx = _grouped(B).to(acc), _grouped(C).to(acc)
    rep = Dc // Bx.shape[1]
    Bx = Bx.repeat_interleave(rep, dim=1)  # [Bt, Dc, N, T]
    Cx = Cx.repeat_interleave(rep, dim=1)
    h = (torch.zeros(Bt, Dc, A.shape[1], dtype=acc, device=u.device) if initial_state is None
         else initial_state.to(acc))
    ys = []
    for t in range(T):
        if reset is not None and bool(reset[t]):
            h = torch.zeros_like(h)
        h = torch.exp(dt[:, :, t, None] * A_) * h + (dt[:, :, t] * u_[:, :, t])[..., None] \
            * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_.new_zeros(Bt, Dc, 0)
    if D is not None:
        y = y + D.to(acc)[None, :, None] * u_
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(acc))
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y
