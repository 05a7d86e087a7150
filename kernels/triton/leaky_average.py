"""Leaky average (DESIGN 2.2, Memory Mosaics' key extractor), forward and backward, in Triton.

    kbar_t = k_t + exp(log_decay_h) * kbar_{t-1}        k, kbar: [B, T, H, E]; state [B, H, E]

One program owns a block of the head width of one (batch, head) and walks the sequence with a
float32 state (float64 for float64 input). As in the selective scan, the forward saves the
state entering every chunk; the backward walks chunks in reverse, recomputes the chunk's states
into a scratch buffer and runs the adjoint ``g_{t-1} = lambda g_t + dkbar_{t-1}``, which gives
dk, d(initial state) and d(log_decay) = lambda * sum_t g_t . kbar_{t-1}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import acc_dtype, check_device, check_float, empty

CHUNK = 32
MAX_BLOCK_E = 64


@triton.jit
def _leaky_fwd_kernel(k, log_decay, h0, y, hT, ckpt, T, H, E, NCHUNK,
                      HAS_H0: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                      ACC: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    lam = tl.exp(tl.load(log_decay + pid_h).to(ACC))
    state = (pid_b * H + pid_h) * E + e  # [B, H, E]
    h = tl.zeros([BLOCK_E], dtype=ACC)
    if HAS_H0:
        h = tl.load(h0 + state, mask=e_ok, other=0.0).to(ACC)
    for c in range(0, NCHUNK):
        tl.store(ckpt + ((pid_b * H + pid_h) * NCHUNK + c) * E + e, h, mask=e_ok)  # [B,H,NC,E]
        for i in range(0, CHUNK):
            t = c * CHUNK + i
            # vector form: a scalar & vector mask fails in the interpreter
            valid = e_ok & ((e * 0 + t) < T)
            off = ((pid_b * T + t) * H + pid_h) * E + e
            k_t = tl.load(k + off, mask=valid, other=0.0).to(ACC)
            h = tl.where(valid, lam * h + k_t, h)
            tl.store(y + off, h.to(y.dtype.element_ty), mask=valid)
    tl.store(hT + state, h, mask=e_ok)


@triton.jit
def _leaky_bwd_kernel(k, log_decay, dy, dhT, ckpt, scratch, dk, dlog_part, dh0, T, H, E,
                      NCHUNK, HAS_DHT: tl.constexpr, BLOCK_E: tl.constexpr,
                      CHUNK: tl.constexpr, ACC: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_e = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    lam = tl.exp(tl.load(log_decay + pid_h).to(ACC))
    state = (pid_b * H + pid_h) * E + e
    # [B, H, n_eblocks, CHUNK + 1, BLOCK_E]: row 0 holds the chunk's entering state
    scr = ((pid_b * H + pid_h) * tl.num_programs(2) + pid_e) * (CHUNK + 1) * BLOCK_E \
        + tl.arange(0, BLOCK_E)
    g = tl.zeros([BLOCK_E], dtype=ACC)  # dL/dkbar_t from the steps after t
    if HAS_DHT:
        g = tl.load(dhT + state, mask=e_ok, other=0.0).to(ACC)
    dl = tl.zeros([BLOCK_E], dtype=ACC)
    for cc in range(0, NCHUNK):
        c = NCHUNK - 1 - cc
        h = tl.load(ckpt + ((pid_b * H + pid_h) * NCHUNK + c) * E + e, mask=e_ok,
                    other=0.0).to(ACC)
        tl.store(scratch + scr, h)
        for i in range(0, CHUNK):
            t = c * CHUNK + i
            valid = e_ok & ((e * 0 + t) < T)
            k_t = tl.load(k + ((pid_b * T + t) * H + pid_h) * E + e, mask=valid,
                          other=0.0).to(ACC)
            h = tl.where(valid, lam * h + k_t, h)
            tl.store(scratch + scr + (i + 1) * BLOCK_E, h)
        # the reverse walk reads states written by other threads of this program
        tl.debug_barrier()
        for ii in range(0, CHUNK):
            i = CHUNK - 1 - ii
            t = c * CHUNK + i
            valid = e_ok & ((e * 0 + t) < T)
            off = ((pid_b * T + t) * H + pid_h) * E + e
            g = g + tl.load(dy + off, mask=valid, other=0.0).to(ACC)
            tl.store(dk + off, g, mask=valid)
            h_prev = tl.load(scratch + scr + i * BLOCK_E)
            # padding steps past T are not steps at all: g passes through them unchanged
            dl += tl.where(valid, g * h_prev, 0.0)
            g = tl.where(valid, lam * g, g)
        tl.debug_barrier()
    tl.store(dh0 + state, g, mask=e_ok)
    tl.store(dlog_part + state, lam * dl, mask=e_ok)


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_e(E: int) -> int:
    return min(triton.next_power_of_2(max(E, 1)), MAX_BLOCK_E)


class _LeakyAverage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, log_decay, h0, chunk):
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
            k, log_decay, h0 if h0 is not None else k, y, hT, ckpt, T, H, E, nchunk,
            HAS_H0=h0 is not None, BLOCK_E=be, CHUNK=chunk, ACC=_tl_acc(k.dtype))
        ctx.save_for_backward(k, log_decay, ckpt)
        ctx.chunk = chunk
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
        scratch = empty((Bt, H, neb, ctx.chunk + 1, be), acc, dev)
        _leaky_bwd_kernel[(Bt, H, neb)](
            k, log_decay, dy, dhT.contiguous() if dhT is not None else k, ckpt, scratch, dk,
            dlog_part, dh0, T, H, E, ckpt.shape[2], HAS_DHT=dhT is not None, BLOCK_E=be,
            CHUNK=ctx.chunk, ACC=_tl_acc(k.dtype))
        need = ctx.needs_input_grad
        return (
            dk.to(k.dtype) if need[0] else None,
            dlog_part.sum((0, 2)).to(log_decay.dtype) if need[1] else None,
            dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None and need[2] else None,
            None,
        )


def _check(k, log_decay, initial_state, chunk):
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


def leaky_average(k, log_decay, initial_state=None, return_final_state=False, chunk=CHUNK):
    """kbar_t = k_t + exp(log_decay_h) kbar_{t-1}, as a Triton kernel.

    k: [B, T, H, E]; log_decay: [H]; initial_state: [B, H, E] (zeros if None). Returns kbar in
    k's dtype and, with ``return_final_state``, the final state in float32 (float64 for float64
    input). Differentiable in k, log_decay and the initial state, and through the final state.
    ``chunk`` (a power of two) sets the steps between saved states; the result does not depend
    on it.
    """
    _check(k, log_decay, initial_state, chunk)
    y, hT = _LeakyAverage.apply(k, log_decay, initial_state, chunk)
    return (y, hT) if return_final_state else y


def leaky_average_ref(k, log_decay, initial_state=None, return_final_state=False):
    """The same function as a plain torch loop over time."""
    acc = acc_dtype(k.dtype)
    Bt, T, H, E = k.shape
    lam = torch.exp(log_decay.to(acc))[None, :, None]
    h = (torch.zeros(Bt, H, E, dtype=acc, device=k.device) if initial_state is None
         else initial_state.to(acc))
    ys = []
    for t in range(T):
        h = k[:, t].to(acc) + lam * h
        ys.append(h)
    y = (torch.stack(ys, dim=1) if ys else k.to(acc)).to(k.dtype)
    return (y, h) if return_final_state else y
