"""The Mamba block (mamba-ssm's ``Mamba`` module) around the selective scan, both forms.

Parameters use mamba-ssm's names and layouts, so a mamba-ssm state dict maps 1:1:
in_proj.weight [2Di, D], conv1d.weight [Di, 1, K], conv1d.bias [Di], x_proj.weight [R + 2N, Di],
dt_proj.weight [Di, R], dt_proj.bias [Di], A_log [Di, N], D [Di], out_proj.weight [D, Di].
With ``spec.inner_norm_eps`` (Jamba's Mamba mixer) dt, B and C are RMS-normalised after x_proj
(``dt_layernorm.weight``, ``b_layernorm.weight``, ``c_layernorm.weight``).
State: ``conv`` [B, Di, K - 1] (the last K - 1 conv inputs) and ``ssm`` [B, Di, N].
"""

from __future__ import annotations

from ..numerics import device, linear, namespace, rms_norm, silu
from ..packed import doc_positions, packed_array
from ..selective_scan import selective_scan, selective_state_update


def init_state(spec, batch: int, like):
    """The state before any token, in ``like``'s namespace, dtype and device."""
    xp, dev, sc = namespace(like), device(like), spec.scan
    return {
        "pos": 0,
        "conv": xp.zeros((batch, sc.d_inner, spec.d_conv - 1), dtype=like.dtype, device=dev),
        "ssm": xp.zeros((batch, sc.d_inner, sc.d_state), dtype=like.dtype, device=dev),
    }


def _split_x_dbl(xp, spec, p, x_dbl):
    """x_proj's output [..., R + 2N] -> dt_low [..., R], B, C [..., N] (normalised with
    inner_norm_eps)."""
    R, N = spec.dt_rank_value, spec.scan.d_state
    parts = (x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:R + 2 * N])
    if spec.inner_norm_eps is None:
        return parts
    return tuple(rms_norm(xp, a, p[n + "_layernorm.weight"], spec.inner_norm_eps)
                 for a, n in zip(parts, ("dt", "b", "c"), strict=True))


def forward(spec, params, x, state, bounds=None):
    """x: [B, T, D] -> (y [B, T, D], state, None). ``params`` holds this block's parameters.
    ``bounds``: a packed row's checked cu_seqlens (from the empty state): the conv window
    and the scan restart at every document; the state is the last document's."""
    xp, p = namespace(x), params
    Di, K = spec.scan.d_inner, spec.d_conv
    xz = linear(xp, x, p["in_proj.weight"])
    xi = xp.permute_dims(xz[..., :Di], (0, 2, 1))  # [B, Di, T]
    z = xp.permute_dims(xz[..., Di:], (0, 2, 1))
    T = xi.shape[-1]
    xcat = xp.concat([state["conv"], xi], axis=-1)  # [B, Di, K - 1 + T]
    w = p["conv1d.weight"][:, 0, :]  # [Di, K]
    conv = p["conv1d.bias"][None, :, None]
    dpos = None if bounds is None else doc_positions(xp, bounds, x)
    for j in range(K):
        tap = w[None, :, j:j + 1] * xcat[:, :, j:j + T]
        if dpos is not None:  # tap j reads position t - (K - 1 - j): not before t's document
            tap = xp.where((dpos >= K - 1 - j)[None, None, :], tap, xp.zeros_like(tap))
        conv = conv + tap
    xc = silu(xp, conv)  # [B, Di, T]
    dt_low, Bm, Cm = _split_x_dbl(xp, spec, p, linear(xp, xp.permute_dims(xc, (0, 2, 1)),
                                                       p["x_proj.weight"]))
    delta = xp.permute_dims(linear(xp, dt_low, p["dt_proj.weight"]), (0, 2, 1))
    A = -xp.exp(p["A_log"])
    y, h = selective_scan(xc, delta, A, xp.permute_dims(Bm, (0, 2, 1)),
                          xp.permute_dims(Cm, (0, 2, 1)), p["D"], z,
                          delta_bias=p["dt_proj.bias"], delta_softplus=True,
                          initial_state=state["ssm"] if bounds is None else None,
                          return_final_state=True, cu_seqlens=packed_array(bounds))
    out = linear(xp, xp.permute_dims(y, (0, 2, 1)), p["out_proj.weight"])
    if bounds is not None:  # the last document's conv inputs, after K - 1 zeros
        last = bounds[-2]
        xcat = xp.concat([state["conv"], xi[:, :, last:]], axis=-1)
        T = T - last
    new_conv = xcat[:, :, xcat.shape[-1] - (K - 1):] if K > 1 else state["conv"]
    return out, {"pos": state["pos"] + T, "conv": new_conv, "ssm": h}, None


def step(spec, params, x_t, state):
    """x_t: [B, D] -> (y_t [B, D], state, None)."""
    xp, p = namespace(x_t), params
    Di = spec.scan.d_inner
    xz = linear(xp, x_t, p["in_proj.weight"])
    xi, z = xz[:, :Di], xz[:, Di:]
    window = xp.concat([state["conv"], xi[:, :, None]], axis=-1)  # [B, Di, K]
    conv = xp.sum(window * p["conv1d.weight"][None, :, 0, :], axis=-1) + p["conv1d.bias"][None]
    xc = silu(xp, conv)  # [B, Di]
    dt_low, Bm, Cm = _split_x_dbl(xp, spec, p, linear(xp, xc, p["x_proj.weight"]))
    delta = linear(xp, dt_low, p["dt_proj.weight"])
    A = -xp.exp(p["A_log"])
    y, h = selective_state_update(state["ssm"], xc, delta, A, Bm, Cm, p["D"], z,
                                  delta_bias=p["dt_proj.bias"], delta_softplus=True)
    out = linear(xp, y, p["out_proj.weight"])
    return out, {"pos": state["pos"] + 1, "conv": window[:, :, 1:], "ssm": h}, None
