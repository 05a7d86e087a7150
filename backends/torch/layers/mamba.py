"""The Mamba block (DESIGN 2.1, section 3) around the selective scan: in_proj to x and z,
causal depthwise conv1d with SiLU, x_proj to dt/B/C, dt_proj, the scan, the gate, out_proj.
With ``spec.inner_norm_eps`` (Jamba's mixer) dt, B and C are RMS-normalised after x_proj.
State: ``conv`` (the last K-1 inputs) and ``ssm`` (h), plus ``pos``."""

from __future__ import annotations

import torch

from ..numerics import linear, rms_norm, silu
from ..packed import cu_tensor, doc_positions
from ..selective_scan import selective_scan, selective_state_update


def init_state(spec, batch: int, *, dtype=torch.float32, device=None) -> dict:
    """Arrays in ``dtype`` (the accumulation dtype)."""
    return {"pos": 0,
            "conv": torch.zeros(batch, spec.d_inner, spec.d_conv - 1, dtype=dtype,
                                device=device),
            "ssm": torch.zeros(batch, spec.d_inner, spec.d_state, dtype=dtype, device=device)}


def _split_x_dbl(spec, p, x_dbl):
    """x_proj's output [..., R + 2N] -> dt_low, B, C (normalised with inner_norm_eps)."""
    R, N = spec.dt_rank_value, spec.d_state
    parts = (x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:R + 2 * N])
    if spec.inner_norm_eps is None:
        return parts
    return tuple(rms_norm(a, p[n + "_layernorm.weight"], spec.inner_norm_eps)
                 for a, n in zip(parts, ("dt", "b", "c"), strict=True))


def causal_conv(xcat, weight, bias, T: int, dpos=None):
    """Depthwise causal convolution in time-first layout: xcat [B, K-1+T, Di] (the state's
    K-1 inputs, then this call's), weight [Di, 1, K] -> [B, T, Di], as conv1d computes it
    (out_t = bias + sum_j w_j xcat_{t+j}). K shifted multiply-adds over contiguous rows: no
    transposes around the convolution, and the output feeds x_proj and the scan as is.
    ``dpos`` [T] (a packed row's positions within documents): a tap that would read before
    its document's first token reads 0 (selected, so another document's NaN stays out)."""
    if dpos is None:
        return _CausalConv.apply(xcat, weight, bias, T)
    w = weight[:, 0, :].t()  # [K, Di]
    K = w.shape[0]

    def tap(j):
        return torch.where((dpos >= K - 1 - j)[None, :, None], xcat[:, j:j + T], 0.0)

    y = torch.addcmul(bias, tap(0), w[0])
    for j in range(1, K):
        y = torch.addcmul(y, tap(j), w[j])
    return y


class _CausalConv(torch.autograd.Function):
    """``causal_conv`` without document bounds, with its backward written out: the taps'
    gradients are added into one buffer in place (autograd would build a zero-filled
    copy of xcat per tap, then add them up)."""

    @staticmethod
    def forward(ctx, xcat, weight, bias, T: int):
        w = weight[:, 0, :].t()  # [K, Di]
        y = torch.addcmul(bias, xcat[:, :T], w[0])
        for j in range(1, w.shape[0]):
            y.addcmul_(xcat[:, j:j + T], w[j])
        ctx.save_for_backward(xcat, weight)
        ctx.T = T
        return y

    @staticmethod
    def backward(ctx, gy):
        xcat, weight = ctx.saved_tensors
        T, K = ctx.T, weight.shape[-1]
        w = weight[:, 0, :].t()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.zeros_like(xcat)
            for j in range(K):
                gx[:, j:j + T].addcmul_(gy, w[j])
        if ctx.needs_input_grad[1]:
            # sum over batch and time of gy * tap j: one [Di] dot product per tap
            gw = torch.stack([(gy * xcat[:, j:j + T]).sum((0, 1)) for j in range(K)],
                             dim=-1)[:, None, :]
        if ctx.needs_input_grad[2]:
            gb = gy.sum((0, 1))
        return gx, gw, gb, None


def forward(spec, p, x, state, bounds=None):
    """x [B, T, D] in the accumulation dtype -> (y, state, None). ``bounds``: a packed row's
    checked cu_seqlens (from the empty state): the convolution and the scan restart at every
    document, and the state is the last document's."""
    Di, K = spec.d_inner, spec.d_conv
    T = x.shape[1]
    # Two products, not one split in two: slicing one [B, T, 2 Di] output would cost its
    # backward a zero-filled gradient of the whole output per half.
    w_in = p["in_proj.weight"]
    xi = linear(x, w_in[:Di])  # [B, T, Di]
    z = linear(x, w_in[Di:]).transpose(1, 2)  # [B, Di, T], a view
    xcat = torch.cat([state["conv"].transpose(1, 2), xi], dim=1)  # [B, K-1+T, Di]
    dpos = None if bounds is None else doc_positions(bounds, x.device)
    xc = silu(causal_conv(xcat, p["conv1d.weight"], p["conv1d.bias"], T, dpos))  # [B, T, Di]
    dt_low, Bm, Cm = _split_x_dbl(spec, p, linear(xc, p["x_proj.weight"]))
    # dt_proj's bias added by the product (one pass less each way than the scan's add)
    delta = torch.nn.functional.linear(dt_low, p["dt_proj.weight"],
                                       p["dt_proj.bias"]).transpose(1, 2)
    A = -torch.exp(p["A_log"])
    y, h = selective_scan(xc.transpose(1, 2), delta, A, Bm.transpose(1, 2),
                          Cm.transpose(1, 2), p["D"], z, delta_softplus=True,
                          initial_state=state["ssm"] if bounds is None else None,
                          return_final_state=True, cu_seqlens=cu_tensor(bounds))
    out = linear(y.transpose(1, 2), p["out_proj.weight"])
    if bounds is not None:  # the last document's conv inputs, after the state's zeros
        xcat = torch.cat([state["conv"].transpose(1, 2), xi[:, bounds[-2]:]], dim=1)
        T = T - bounds[-2]
    conv = (xcat[:, xcat.shape[1] - (K - 1):].transpose(1, 2) if K > 1 else state["conv"])
    return out, {"pos": state["pos"] + T, "conv": conv, "ssm": h}, None


def step(spec, p, x_t, state, *, inplace: bool = False):
    """One token; with ``inplace`` the convolution window and the SSM state are written
    into ``state``'s own tensors."""
    Di = spec.d_inner
    xz = linear(x_t, p["in_proj.weight"])
    xi, z = xz[:, :Di], xz[:, Di:]
    conv = state["conv"]
    window = torch.cat([conv, xi[:, :, None]], dim=-1)  # [B, Di, K]
    xc = silu((window * p["conv1d.weight"][:, 0, :]).sum(-1) + p["conv1d.bias"])
    dt_low, Bm, Cm = _split_x_dbl(spec, p, linear(xc, p["x_proj.weight"]))
    delta = linear(dt_low, p["dt_proj.weight"])
    A = -torch.exp(p["A_log"])
    if inplace:
        conv.copy_(window[:, :, 1:])
    else:
        conv = window[:, :, 1:]
    y, h = selective_state_update(state["ssm"], xc, delta, A, Bm, Cm, p["D"], z,
                                  delta_bias=p["dt_proj.bias"], delta_softplus=True,
                                  inplace=inplace)
    return linear(y, p["out_proj.weight"]), {"pos": state["pos"] + 1, "conv": conv,
                                             "ssm": h}, None
