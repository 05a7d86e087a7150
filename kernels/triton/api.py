"""Entry points that pick the Triton kernels or the torch path at call time.

``kernels_enabled(tensor)``: CUDA tensors use the kernels (when triton is importable), other
tensors the torch backend. ``MEMCORE_KERNELS=triton`` or ``=torch`` forces one path whatever
the device (tests force the kernels on the CPU under ``TRITON_INTERPRET=1``). The decision is
made per call from the tensor, never from what happened to import.

The selective scan has a second choice among GPU paths, ``scan_path``: the Triton kernel or
mamba-ssm's CUDA ``selective_scan_fn`` (``memcore.kernels.triton.mamba_ssm_scan``), which
serves only calls without an initial state. ``MEMCORE_SCAN=triton`` or ``=mamba_ssm`` picks
one; unset, ``DEFAULT_SCAN`` decides. It is the Triton kernel until a GPU run of
``python -m benchmarks gpu`` (which prints the path this picks and both timings) shows
mamba-ssm faster; none has been measured yet.

The functions keep the signatures of ``memcore.spec.reference.ops`` (``selective_scan``,
``leaky_average``, ``windowed_attention``, ``associative_readout``, ``store_top``,
``store_merge``, ``innovation_scores``), so a caller can swap them in; ``bmojo_attention``
adds the store source and has no torch-backend twin, so off the kernels it runs the plain
reference loop of ``memcore.kernels.triton.bmojo_attention``. ``innovation_select`` (the
per-chunk selection and store merge of the bmojo layer) likewise runs the chunk loop of
``memcore.kernels.triton.innovation_select`` over the torch store merge off the kernels.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV = "MEMCORE_KERNELS"
CHOICES = ("triton", "torch")
SCAN_ENV = "MEMCORE_SCAN"
SCAN_CHOICES = ("triton", "mamba_ssm")
# No GPU benchmark has compared the two yet (benchmarks/gpu.py does): the Triton kernel, which
# serves every call, until one shows mamba-ssm's faster.
DEFAULT_SCAN = "triton"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_enabled(tensor) -> bool:
    """Whether a call on ``tensor`` runs the Triton kernels."""
    mode = os.environ.get(ENV, "").strip().lower()
    if mode not in CHOICES + ("",):
        raise ValueError(f"{ENV} must be one of {CHOICES} or unset, got {mode!r}")
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise ImportError(f"{ENV}=triton asks for the Triton kernels, but triton is not "
                              f"installed (pip install 'memcore[triton]')")
        return True
    return isinstance(tensor, torch.Tensor) and tensor.is_cuda and triton_available()


def scan_path(u, initial_state=None) -> str:
    """Which GPU path runs a selective scan that takes the kernels: "triton" or "mamba_ssm".

    mamba-ssm's is taken only where chosen (``MEMCORE_SCAN``, else ``DEFAULT_SCAN``), importable,
    and able to compute the call (``mamba_ssm_scan.servable``: no initial state). Asked for by
    name but not importable, it raises; as the default, it falls back to the Triton kernel."""
    from . import mamba_ssm_scan

    mode = os.environ.get(SCAN_ENV, "").strip().lower()
    if mode not in SCAN_CHOICES + ("",):
        raise ValueError(f"{SCAN_ENV} must be one of {SCAN_CHOICES} or unset, got {mode!r}")
    if (mode or DEFAULT_SCAN) != "mamba_ssm":
        return "triton"
    if mamba_ssm_scan.mamba_ssm_scan_fn() is None:
        if mode:
            raise ImportError(f"{SCAN_ENV}=mamba_ssm asks for mamba-ssm's selective_scan_fn, "
                              f"which does not import (pip install mamba-ssm, built with CUDA)")
        return "triton"
    return "mamba_ssm" if mamba_ssm_scan.servable(u, initial_state) else "triton"


def scan_kernel(u, initial_state):
    """The selective scan that runs a call taking the kernels."""
    if scan_path(u, initial_state) == "mamba_ssm":
        from .mamba_ssm_scan import selective_scan as kernel
    else:
        from .selective_scan import selective_scan as kernel
    return kernel


def _torch_ops():
    from memcore.backends.torch import ops

    return ops


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False):
    """DESIGN 2.1; see ``memcore.spec.reference.scan.selective_scan``."""
    if kernels_enabled(u):
        kernel = scan_kernel(u, initial_state)
    else:
        kernel = _torch_ops().selective_scan
    return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                  delta_softplus=delta_softplus, initial_state=initial_state,
                  return_final_state=return_final_state)


def leaky_average(k, log_decay, initial_state=None, return_final_state=False):
    """DESIGN 2.2; see ``memcore.spec.reference.scan.leaky_average``."""
    if kernels_enabled(k):
        from .leaky_average import leaky_average as kernel
    else:
        kernel = _torch_ops().leaky_average
    return kernel(k, log_decay, initial_state=initial_state,
                  return_final_state=return_final_state)


def _ring_positions(n: int, size: int, device):
    """Position held by each slot of a ring of ``size`` after ``n`` tokens (< 0: empty), the
    state layout of ``memcore.spec.reference.ops.windowed_attention``."""
    i = torch.arange(size, device=device)
    if n == 0:
        return i * 0 - 1
    return (n - 1) - torch.remainder((n - 1) - i, size)


def _ring_to_seq(ring, n: int, length: int):
    """The last ``length`` positions before ``n`` as a sequence [B, length, H, E] read from a
    ring [B, H, size, E]; positions the ring does not hold read as zeros."""
    B, H, size, E = ring.shape
    want = torch.arange(n - length, n, device=ring.device)
    held = _ring_positions(n, size, ring.device)
    onehot = ((want[:, None] == held[None, :]) & (held[None, :] >= 0)).to(ring.dtype)
    return (onehot @ ring).permute(0, 2, 1, 3)  # a matmul keeps autograd into the ring


def _seq_to_ring(seq, start: int, n: int, size: int):
    """The ring of ``size`` after ``n`` tokens, from ``seq`` [B, L, H, E] at positions
    start .. start + L - 1. [B, H, size, E]."""
    held = _ring_positions(n, size, seq.device)
    idx = held - start
    ok = (held >= 0) & (idx >= 0) & (idx < seq.shape[1])
    onehot = ((idx[:, None] == torch.arange(seq.shape[1], device=seq.device)[None, :])
              & ok[:, None]).to(seq.dtype)
    return onehot @ seq.permute(0, 2, 1, 3)


def windowed_attention(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                       return_final_state=False):
    """DESIGN 2.3 raw and fading sources; same signature, state and result as
    ``memcore.spec.reference.ops.windowed_attention``."""
    if not kernels_enabled(q):
        return _torch_ops().windowed_attention(q, k, v, window, fading_k, fading_v,
                                               initial_state, return_final_state)
    from memcore.spec.validate import check_attention_args

    from .bmojo_attention import bmojo_attention

    check_attention_args(q, k, v, fading_k, fading_v, window, initial_state, streaming=False)
    fading = fading_k is not None
    B, T, H, E = q.shape
    pos = 0 if initial_state is None else int(initial_state["pos"])
    # keys before the queries that a query can still reach: W raw, 2W with the fading window
    if window is None:
        reach = pos
    else:
        reach = min(pos, 2 * window if fading else window)
    seqs = {"k": k, "v": v}
    if fading:
        seqs.update(fk=fading_k, fv=fading_v)
    if reach > 0:
        for name in seqs:
            if window is None:  # the state is a KV cache [B, H, pos, E] in position order
                prev = initial_state[name].permute(0, 2, 1, 3)
            else:
                prev = _ring_to_seq(initial_state[name], pos, reach)
            seqs[name] = torch.cat([prev.to(q.dtype), seqs[name]], 1)
    o = bmojo_attention(q, seqs["k"], seqs["v"], window, seqs.get("fk"), seqs.get("fv"),
                        pos=pos)
    if not return_final_state:
        return o
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = pos + T
    new = {"pos": n}
    for name, seq in seqs.items():
        if window is None:
            new[name] = seq.permute(0, 2, 1, 3).to(acc)
        else:
            size = 2 * window if name in ("fk", "fv") else window
            new[name] = _seq_to_ring(seq.to(acc), pos - reach, n, size)
    return o, new


def bmojo_attention(q, k, v, window, fading_k=None, fading_v=None, store_k=None, store_v=None,
                    store_pos=None, chunk=None, pos=0):
    """All three sources; see ``memcore.kernels.triton.bmojo_attention.bmojo_attention``."""
    if kernels_enabled(q):
        from .bmojo_attention import bmojo_attention as kernel
    else:
        from .bmojo_attention import bmojo_attention_ref as kernel
    return kernel(q, k, v, window, fading_k, fading_v, store_k, store_v, store_pos, chunk, pos)


def associative_readout(k, v, capacity=None):
    """DESIGN 2.5; see ``memcore.spec.reference.ops.associative_readout``."""
    if kernels_enabled(k):
        from .associative_readout import associative_readout as kernel
    else:
        kernel = _torch_ops().associative_readout
    return kernel(k, v, capacity)


def store_top(entries: dict, n: int) -> dict:
    """DESIGN 2.4; see ``memcore.spec.reference.ops.store_top``."""
    if kernels_enabled(entries["k"]):
        from .innovation_select import store_top as kernel
    else:
        kernel = _torch_ops().store_top
    return kernel(entries, n)


def store_merge(a: dict, b: dict, n: int) -> dict:
    """DESIGN 2.4; see ``memcore.spec.reference.ops.store_merge``."""
    if kernels_enabled(a["k"]):
        from .innovation_select import store_merge as kernel
    else:
        kernel = _torch_ops().store_merge
    return kernel(a, b, n)


def innovation_scores(x, s_prev, pred_weight):
    """DESIGN 2.4; see ``memcore.spec.reference.ops.innovation_scores`` (a matmul: torch on
    every device)."""
    return _torch_ops().innovation_scores(x, s_prev, pred_weight)


def innovation_select(tokens: dict, pos: int, chunk: int, select: int, store: dict,
                      cand: dict):
    """The per-chunk top-``select`` and the store merge over a call's tokens; see
    ``memcore.kernels.triton.innovation_select.innovation_select``."""
    from . import innovation_select as mod

    if kernels_enabled(tokens["k"]):
        return mod.innovation_select(tokens, pos, chunk, select, store, cand)
    return mod.innovation_select_ref(tokens, pos, chunk, select, store, cand,
                                     _torch_ops().store_merge)
