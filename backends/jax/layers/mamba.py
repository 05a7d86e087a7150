"""The Mamba block (mamba-ssm's ``Mamba``) around the selective scan, both forms, as
``memcore.spec.reference.layers.mamba``.

With ``spec.inner_norm_eps`` (Jamba's mixer) dt, B and C are RMS-normalised after x_proj.
State: ``conv`` [B, Di, K - 1] (last K - 1 conv inputs), ``ssm`` [B, Di, N], ``pos``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..numerics import POS_DTYPE, linear, rms_norm, silu
from ..packed import doc_positions, last_start
from ..selective_scan import selective_scan, selective_state_update


def init_state(spec, batch: int, dtype, max_len: int = 0) -> dict:
    return {"conv": jnp.zeros((batch, spec.d_inner, spec.d_conv - 1), dtype),
            "ssm": jnp.zeros((batch, spec.d_inner, spec.d_state), dtype),
            "pos": jnp.zeros((), POS_DTYPE)}


def _split(spec, p, x_dbl):
    """x_proj's output [..., R + 2N] -> dt_low, B, C (normalised with inner_norm_eps)."""
    R, N = spec.dt_rank_value, spec.d_state
    parts = (x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:R + 2 * N])
    if spec.inner_norm_eps is None:
        return parts
    return tuple(rms_norm(a, p[n + "_layernorm.weight"], spec.inner_norm_eps)
                 for a, n in zip(parts, ("dt", "b", "c"), strict=True))


def forward(spec, p, x, state, *, implementation="auto", cu_seqlens=None):
    """x: [B, T, D] -> (y [B, T, D], state, None). ``cu_seqlens``: a packed row's checked
    boundaries (from the empty state): the conv taps and the scan restart at every document;
    the state is the last document's."""
    Di, K = spec.d_inner, spec.d_conv
    cu = cu_seqlens
    xz = linear(x, p["in_proj.weight"])
    xi = jnp.swapaxes(xz[..., :Di], 1, 2)  # [B, Di, T]
    z = jnp.swapaxes(xz[..., Di:], 1, 2)
    T = xi.shape[-1]
    xcat = jnp.concatenate([state["conv"], xi], axis=-1)
    w = p["conv1d.weight"][:, 0, :]
    conv = p["conv1d.bias"][None, :, None]
    dpos = None if cu is None else doc_positions(cu, T)
    for j in range(K):  # K is the static conv width (4), not time
        tap = w[None, :, j:j + 1] * xcat[:, :, j:j + T]
        if dpos is not None:  # tap j reads t - (K - 1 - j): not before t's document
            tap = jnp.where((dpos >= K - 1 - j)[None, None, :], tap, jnp.zeros((), tap.dtype))
        conv = conv + tap
    xc = silu(conv)
    dt_low, Bm, Cm = _split(spec, p, linear(jnp.swapaxes(xc, 1, 2), p["x_proj.weight"]))
    delta = jnp.swapaxes(linear(dt_low, p["dt_proj.weight"]), 1, 2)
    y, h = selective_scan(xc, delta, -jnp.exp(p["A_log"]), jnp.swapaxes(Bm, 1, 2),
                          jnp.swapaxes(Cm, 1, 2), p["D"], z, p["dt_proj.bias"], True,
                          initial_state=state["ssm"] if cu is None else None,
                          return_final_state=True, cu_seqlens=cu, implementation=implementation)
    out = linear(jnp.swapaxes(y, 1, 2), p["out_proj.weight"])
    new_conv = xcat[:, :, xcat.shape[-1] - (K - 1):] if K > 1 else state["conv"]
    n = T
    if cu is not None:  # the last document's conv inputs, zeros before its first token
        n = T - last_start(cu)
        rows = jnp.arange(T - K + 1, T)
        new_conv = jnp.where((rows >= last_start(cu))[None, None, :], new_conv,
                             jnp.zeros((), new_conv.dtype))
    return out, {"conv": new_conv, "ssm": h, "pos": state["pos"] + n}, None


def step(spec, p, x_t, state):
    """x_t: [B, D] -> (y_t [B, D], state, None)."""
    Di = spec.d_inner
    xz = linear(x_t, p["in_proj.weight"])
    xi, z = xz[:, :Di], xz[:, Di:]
    window = jnp.concatenate([state["conv"], xi[:, :, None]], axis=-1)
    conv = jnp.sum(window * p["conv1d.weight"][None, :, 0, :], axis=-1) + p["conv1d.bias"][None]
    xc = silu(conv)
    dt_low, Bm, Cm = _split(spec, p, linear(xc, p["x_proj.weight"]))
    delta = linear(dt_low, p["dt_proj.weight"])
    y, h = selective_state_update(state["ssm"], xc, delta, -jnp.exp(p["A_log"]), Bm, Cm, p["D"],
                                  z, p["dt_proj.bias"], True)
    out = linear(y, p["out_proj.weight"])
    return out, {"conv": window[:, :, 1:], "ssm": h, "pos": state["pos"] + 1}, None
