"""Leaky average (DESIGN 2.2, Memory Mosaics' key extractor), forward and backward, in Triton.

    kbar_t = k_t + exp(log_decay_h) * kbar_{t-1}        k, kbar: [B, T, H, E]; state [B, H, E]

One program owns a block of the head width of one (batch, head) and walks the sequence chunk by
chunk: a chunk is a [time, width] tile scanned with ``tl.associative_scan``, the state carried
between chunks in float32 (float64 for float64 input). The forward saves the state entering
every chunk; the backward walks chunks in reverse, rebuilds kbar_{t-1} from the saved state with
a shifted scan, and runs the adjoint ``g_t = dkbar_t + lambda g_{t+1}`` as a suffix scan,
which gives dk, d(initial state) and d(log_decay) = lambda * sum_t g_t . kbar_{t-1}.

Packed rows (``reset``, True where a document starts): the state restarts from zero there, by
selection (``restart_combine``) rather than a zero decay, so a non-finite state never crosses
into the next document; in the backward no adjoint crosses a restart and the decay across one
adds nothing to d(log_decay) (kbar_{t-1} is 0 at a restart).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .affine_scan import combine as _combine
from .affine_scan import restart_combine as _restart_combine
from .affine_scan import restart_suffix_scan as _restart_suffix_scan
from .affine_scan import suffix_scan as _suffix_scan
from .buffers import acc_dtype, check_device, check_float, empty, tl_acc

CHUNK = 32
MAX_BLOCK_E = 32  # a program holds [chunk, BLOCK_E] tiles


@triton.jit
def _tile(k, b, h, t, e, T, H, E, lam, ACC: tl.constexpr):
    """Rows t of k as a [BT, BE] tile, with the decay of each step (1 outside [0, T))."""
    ok = ((t >= 0) & (t < T))[:, None] & (e < E)[None, :]
    kt = tl.load(k + ((b * T + t[:, None]) * H + h) * E + e[None, :], mask=ok,
                 other=0.0).to(ACC)
    return kt, tl.where(ok, lam, 1.0).to(ACC), ok


@triton.jit
def _load_reset(reset, t, T, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr):
    """Restart flags (1 where a packed row's document starts) at times t [BT], as a [BT, BE]
    tile; 0 outside [0, T)."""
    r = tl.load(reset + t, mask=(t >= 0) & (t < T), other=0).to(ACC)
    return tl.broadcast_to(r[:, None], (CHUNK, BLOCK_E))


@triton.jit
def _program(log_decay, given, H, E, GIVEN: tl.constexpr, BLOCK_E: tl.constexpr,
             ACC: tl.constexpr):
    """Program (batch row, head, block of the width): pid_b, pid_h, the block's indices e [BE]
    and their mask, its offsets into [B, H, E], the decay lambda, and the block of ``given``
    [B, H, E] (0 unless GIVEN)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    lam = tl.exp(tl.load(log_decay + pid_h).to(ACC))
    state = (pid_b * H + pid_h) * E + e
    x = tl.zeros([BLOCK_E], dtype=ACC)
    if GIVEN:
        x = tl.load(given + state, mask=e_ok, other=0.0).to(ACC)
    return pid_b, pid_h, e, e_ok, state, lam, x


@triton.jit
def _leaky_fwd_kernel(k, log_decay, h0, reset, y, hT, ckpt, T, H, E, NCHUNK,
                      HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, BLOCK_E: tl.constexpr,
                      CHUNK: tl.constexpr, ACC: tl.constexpr):
    pid_b, pid_h, e, e_ok, state, lam, h = _program(log_decay, h0, H, E, HAS_H0, BLOCK_E, ACC)
    i = tl.arange(0, CHUNK)
    for c in range(0, NCHUNK):
        tl.store(ckpt + ((pid_b * H + pid_h) * NCHUNK + c) * E + e, h, mask=e_ok)  # [B,H,NC,E]
        t = c * CHUNK + i
        kt, a, ok = _tile(k, pid_b, pid_h, t, e, T, H, E, lam, ACC)
        if HAS_RESET:  # a restart drops the state before it (selected, never times zero)
            f = _load_reset(reset, t, T, BLOCK_E, CHUNK, ACC)
            a_cum, b_cum, f_cum = tl.associative_scan((a, kt, f), 0, _restart_combine)
            hs = tl.where(f_cum > 0, b_cum, a_cum * h[None, :] + b_cum)
        else:
            a_cum, b_cum = tl.associative_scan((a, kt), 0, _combine)
            hs = a_cum * h[None, :] + b_cum  # [BT, BE]
        tl.store(y + ((pid_b * T + t[:, None]) * H + pid_h) * E + e[None, :],
                 hs.to(y.dtype.element_ty), mask=ok)
        # padding steps are the identity, so the last row is the state after the chunk
        h = tl.sum(tl.where((i == CHUNK - 1)[:, None], hs, 0.0), axis=0)
    tl.store(hT + state, h, mask=e_ok)


@triton.jit
def _leaky_bwd_kernel(k, log_decay, dy, dhT, ckpt, reset, dk, dlog_part, dh0, T, H, E,
                      NCHUNK, HAS_DHT: tl.constexpr, HAS_RESET: tl.constexpr,
                      BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr):
    # carry: dL/dkbar at the chunk's last step, from later
    pid_b, pid_h, e, e_ok, state, lam, carry = _program(log_decay, dhT, H, E, HAS_DHT, BLOCK_E,
                                                        ACC)
    i = tl.arange(0, CHUNK)
    dl = tl.zeros([BLOCK_E], dtype=ACC)
    for cc in range(0, NCHUNK):
        c = NCHUNK - 1 - cc
        h_in = tl.load(ckpt + ((pid_b * H + pid_h) * NCHUNK + c) * E + e, mask=e_ok,
                       other=0.0).to(ACC)
        t = c * CHUNK + i
        _, a, ok = _tile(k, pid_b, pid_h, t, e, T, H, E, lam, ACC)
        # kbar_{t-1}: a scan of the steps shifted by one, the chunk's first row the identity
        kp, ap, _ = _tile(k, pid_b, pid_h, tl.where(i == 0, -1, t - 1), e, T, H, E, lam, ACC)
        if HAS_RESET:
            # restarts up to t - 1 cut the rebuilt state; one at t makes kbar_{t-1} zero, so
            # the decay across it adds nothing to d(log_decay)
            f_p = _load_reset(reset, tl.where(i == 0, -1, t - 1), T, BLOCK_E, CHUNK, ACC)
            ap_cum, bp_cum, fp_cum = tl.associative_scan((ap, kp, f_p), 0, _restart_combine)
            h_prev = tl.where(fp_cum > 0, bp_cum, ap_cum * h_in[None, :] + bp_cum)
            f_t = _load_reset(reset, t, T, BLOCK_E, CHUNK, ACC)
            h_prev = tl.where(f_t > 0, 0.0, h_prev)
        else:
            ap_cum, bp_cum = tl.associative_scan((ap, kp), 0, _combine)
            h_prev = ap_cum * h_in[None, :] + bp_cum
        # g_t = dy_t + lambda_{t+1} g_{t+1}: a suffix scan with the next steps' decays
        _, an, _ = _tile(k, pid_b, pid_h, tl.where(i == CHUNK - 1, -1, t + 1), e, T, H, E, lam,
                         ACC)
        off = ((pid_b * T + t[:, None]) * H + pid_h) * E + e[None, :]
        dy_t = tl.load(dy + off, mask=ok, other=0.0).to(ACC)
        if HAS_RESET:  # a restart at t + 1 passes nothing back to t
            f_n = _load_reset(reset, tl.where(i == CHUNK - 1, -1, t + 1), T, BLOCK_E, CHUNK,
                              ACC)
            an_cum, g_in, fn_cum = _restart_suffix_scan(an, dy_t, f_n, 0)
            gs = tl.where(fn_cum > 0, g_in, g_in + an_cum * carry[None, :])
        else:
            an_cum, g_in = _suffix_scan(an, dy_t, 0)
            gs = g_in + an_cum * carry[None, :]
        tl.store(dk + off, gs, mask=ok)
        dl += tl.sum(tl.where(ok, gs * h_prev, 0.0), axis=0)
        # dL/dkbar entering the chunk = lambda g_first (0 where the chunk starts a document)
        first = a * gs
        if HAS_RESET:
            first = tl.where(f_t > 0, 0.0, first)
        carry = tl.sum(tl.where((i == 0)[:, None], first, 0.0), axis=0)
    tl.store(dh0 + state, carry, mask=e_ok)
    tl.store(dlog_part + state, lam * dl, mask=e_ok)


def _block_e(E: int) -> int:
    return min(triton.next_power_of_2(max(E, 1)), MAX_BLOCK_E)


class _LeakyAverage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, log_decay, h0, chunk, reset):
        k, log_decay = k.contiguous(), log_decay.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        Bt, T, H, E = k.shape
        acc = acc_dtype(k.dtype)
        be = _block_e(E)
        nchunk = triton.cdiv(T, chunk)
        y = empty((Bt, T, H, E), k.dtype, k.device)
        hT = empty((Bt, H, E), acc, k.device)
        ckpt = empty((Bt, H, nchunk, E), acc, k.device)
        _leaky_fwd_kernel[(Bt, H, triton.cdiv(E, be))](
            k, log_decay, h0 if h0 is not None else k, reset if reset is not None else k, y, hT,
            ckpt, T, H, E, nchunk, HAS_H0=h0 is not None, HAS_RESET=reset is not None,
            BLOCK_E=be, CHUNK=chunk, ACC=tl_acc(k.dtype))
        ctx.save_for_backward(k, log_decay, ckpt)
        ctx.chunk = chunk
        ctx.reset = reset
        ctx.h0_dtype = None if h0 is None else h0.dtype
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        k, log_decay, ckpt = ctx.saved_tensors
        Bt, T, H, E = k.shape
        acc = acc_dtype(k.dtype)
        dev = k.device
        be = _block_e(E)
        neb = triton.cdiv(E, be)
        dy = torch.zeros_like(k) if dy is None else dy.contiguous()
        dk = empty((Bt, T, H, E), acc, dev)
        dlog_part = empty((Bt, H, E), acc, dev)
        dh0 = empty((Bt, H, E), acc, dev)
        _leaky_bwd_kernel[(Bt, H, neb)](
            k, log_decay, dy, dhT.contiguous() if dhT is not None else k, ckpt,
            ctx.reset if ctx.reset is not None else k, dk, dlog_part, dh0, T, H, E,
            ckpt.shape[2], HAS_DHT=dhT is not None, HAS_RESET=ctx.reset is not None,
            BLOCK_E=be, CHUNK=ctx.chunk, ACC=tl_acc(k.dtype))
        need = ctx.needs_input_grad
        return (
            dk.to(k.dtype) if need[0] else None,
            dlog_part.sum((0, 2)).to(log_decay.dtype) if need[1] else None,
            dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None and need[2] else None,
            None,
            None,
        )


def _check(k, log_decay, initial_state, chunk, reset):
    where = "leaky_average"
    check_float(where, "k", k)
    check_float(where, "log_decay", log_decay)
    if initial_state is not None:
        check_float(where, "initial_state", initial_state)
    check_device(where, k, log_decay=log_decay, initial_state=initial_state)
    if k.ndim != 4:
        raise ValueError(f"{where}: k must be [batch, T, heads, head_dim], got shape "
                         f"{tuple(k.shape)}")
    Bt, _, H, E = k.shape
    if tuple(log_decay.shape) != (H,):
        raise ValueError(f"{where}: log_decay must be [heads={H}], got {tuple(log_decay.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bt, H, E):
        raise ValueError(f"{where}: initial_state must be [batch={Bt}, heads={H}, "
                         f"head_dim={E}], got {tuple(initial_state.shape)}")
    if not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"{where}: chunk must be a power of two, got {chunk!r}")
    if reset is not None and (reset.dtype != torch.bool or reset.ndim != 1
                              or reset.shape[0] != k.shape[1] or reset.device != k.device):
        raise ValueError(f"{where}: reset must be bool [T={k.shape[1]}] on {k.device}, got "
                         f"{reset.dtype} of shape {tuple(reset.shape)} on {reset.device}")


def leaky_average(k, log_decay, initial_state=None, return_final_state=False, chunk=CHUNK,
                  reset=None):
    """kbar_t = k_t + exp(log_decay_h) kbar_{t-1}, as a Triton kernel.

    k: [B, T, H, E]; log_decay: [H]; initial_state: [B, H, E] (zeros if None). Returns kbar in
    k's dtype and, with ``return_final_state``, the final state in float32 (float64 for float64
    input). Differentiable in k, log_decay and the initial state, and through the final state.
    ``chunk`` (a power of two) sets the steps between saved states; the result does not depend
    on it. ``reset`` (bool [T], packed rows): the average restarts from zero where it is True,
    as if the sequence began there (a packed row's document starts; the same for every batch
    row).
    """
    _check(k, log_decay, initial_state, chunk, reset)
    if reset is not None:
        reset = reset.to(torch.int8).contiguous()
    y, hT = _LeakyAverage.apply(k, log_decay, initial_state, chunk, reset)
    return (y, hT) if return_final_state else y


def leaky_average_ref(k, log_decay, initial_state=None, return_final_state=False, reset=None):
    """The same function as a plain torch loop over time; ``reset`` [T]: the average restarts
    from zero there."""
    acc = acc_dtype(k.dtype)
    Bt, T, H, E = k.shape
    lam = torch.exp(log_decay.to(acc))[None, :, None]
    h = (torch.zeros(Bt, H, E, dtype=acc, device=k.device) if initial_state is None
         else initial_state.to(acc))
    ys = []
    for t in range(T):
        if reset is not None and bool(reset[t]):
            h = torch.zeros_like(h)
        h = k[:, t].to(acc) + lam * h
        ys.append(h)
    y = (torch.stack(ys, dim=1) if ys else k.to(acc)).to(k.dtype)
    return (y, h) if return_final_state else y
