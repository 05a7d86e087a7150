"""Where a torch-backend hot path runs: the Triton kernels or the plain torch code.

The decision is taken per call from the tensor by ``memcore.kernels.triton.api.kernels_enabled``
(CUDA tensors with triton installed use the kernels; ``MEMCORE_KERNELS=triton|torch`` forces
either). Kernel modules import triton, so they are imported only once the kernels are chosen:
a CPU-only install never imports triton. Routed here: the selective scan (mamba and fading
blocks; mamba-ssm's CUDA function instead where ``MEMCORE_SCAN`` picks it), the leaky
average (mosaic and persistent key extractors), the mosaic readout (``mosaic_readout``;
without a capacity only on a first call, since a stored cache would be re-read as queries)
and the windowed readout with a window (raw, fading and store sources in one kernel). Full
causal attention and the one-token step forms stay on the torch path.
"""

from __future__ import annotations

import torch


def use_kernels(x) -> bool:
    """Whether the call on ``x`` runs the Triton kernels."""
    from memcore.kernels.triton.api import kernels_enabled

    return kernels_enabled(x)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                   return_final_state):
    """The Triton selective scan, or mamba-ssm's CUDA one where ``MEMCORE_SCAN`` (or the
    default) picks it and it can serve the call (no initial state); same arguments and
    results as the torch one. See ``memcore.kernels.triton.api.scan_path``."""
    from memcore.kernels.triton.api import scan_kernel

    kernel = scan_kernel(u, initial_state)
    return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                  delta_softplus=delta_softplus, initial_state=initial_state,
                  return_final_state=return_final_state)


def leaky_average(k, log_decay, initial_state, return_final_state):
    """The Triton leaky average (same arguments and results as the torch one)."""
    from memcore.kernels.triton.leaky_average import leaky_average as kernel

    return kernel(k, log_decay, initial_state=initial_state,
                  return_final_state=return_final_state)


def associative_readout(k, v, capacity):
    """The Triton associative readout (same arguments and result as the torch op)."""
    from memcore.kernels.triton.associative_readout import associative_readout as kernel

    return kernel(k, v, capacity)


def mosaic_readout(k, pair_k, pair_v, capacity):
    """Memory Mosaics' readout of one call on the kernel, whose keys double as queries.

    k: the call's keys [B, T, H, E] (the queries); pair_k, pair_v [B, H, S, E]: the stored
    pairs still in reach followed by the pairs this call completes, in position order, with
    no gap before the call's first query. The kernel reads one plain sequence: the call's
    queries follow the stored keys, and the last key, whose value is not known yet, gets a
    zero value that no query reaches (each reads only earlier positions). The rows of the
    stored keys are computed and dropped. Returns y [B, T, H, E].
    """
    T = k.shape[1]
    seq_k = torch.cat([pair_k.transpose(1, 2), k[:, T - 1:]], dim=1)
    seq_v = torch.cat([pair_v.transpose(1, 2), torch.zeros_like(k[:, :1])], dim=1)
    return associative_readout(seq_k, seq_v, capacity)[:, seq_k.shape[1] - T:]


def windowed_readout(q, pos: int, window: int, raw, fading=None, snap=None, chunk=None):
    """The windowed layers' readout (raw window, fading window, store) on the B'MOJO kernel.

    q [B, H, T, E] at positions pos ..; raw = (k, v) [B, H, W + T, E] from position pos - W;
    fading = (k, v) [B, H, 2W + T, E] from pos - 2W; snap: the store snapshots of each chunk
    the call touches (k, v [B, H, nC, M, E], pos [B, nC, M]). Returns o [B, H, T, E].
    """
    from memcore.kernels.triton.bmojo_attention import bmojo_attention as kernel

    B, H, T, E = q.shape
    # The kernel takes one cache length for both windows; rows before position 0 (the rings'
    # empty slots) are left out, and the raw cache is padded where only the fading one reaches.
    reach = min(pos, 2 * window if fading is not None else window)

    def seq(a, back: int):
        held = min(reach, back)
        a = a[:, :, back - held:]
        if held < reach:  # beyond the raw window: never visible to a raw key
            a = torch.cat([a.new_zeros(B, H, reach - held, E), a], dim=2)
        return a.transpose(1, 2)

    k, v = (seq(a, window) for a in raw)
    fk = fv = None
    if fading is not None:
        fk, fv = (seq(a, 2 * window) for a in fading)
    sk = sv = sp = None
    if snap is not None:
        sk, sv, sp = snap["k"], snap["v"], snap["pos"]
    o = kernel(q.transpose(1, 2), k, v, window, fk, fv, sk, sv, sp,
               chunk if snap is not None else None, pos)
    return o.transpose(1, 2)
