"""Entry points that pick the Pallas kernels or the JAX backend path at call time.

``kernels_enabled(array)``: arrays on a GPU use the kernels (compiled), other arrays the JAX
backend (``memcore.backends.jax.ops``). ``MEMCORE_KERNELS=pallas`` or ``=jax`` forces one path
whatever the device; the kernels forced onto a CPU run in the Pallas interpreter. The decision is
made per call from the array, never from what happened to import.

``selective_scan`` and ``windowed_attention`` keep the signatures, states and results of
``memcore.spec.reference.ops``, so a caller can swap them in; ``bmojo_attention`` adds the
store source (the signature of ``memcore.kernels.triton.api.bmojo_attention``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

ENV = "MEMCORE_KERNELS"
CHOICES = ("pallas", "jax")


def _on_gpu(array) -> bool:
    try:
        devices = array.devices()
    except (AttributeError, jax.errors.ConcretizationTypeError):
        # a tracer inside jit has no device yet: it will run on the default backend
        return isinstance(array, jax.Array) and jax.default_backend() == "gpu"
    return any(d.platform == "gpu" for d in devices)


def kernels_enabled(array) -> bool:
    """Whether a call on ``array`` runs the Pallas kernels."""
    mode = os.environ.get(ENV, "").strip().lower()
    if mode not in CHOICES + ("",):
        raise ValueError(f"{ENV} must be one of {CHOICES} or unset, got {mode!r}")
    if mode:
        return mode == "pallas"
    return isinstance(array, jax.Array) and _on_gpu(array)


def _jax_ops():
    from memcore.backends.jax import ops

    return ops


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False):
    """DESIGN 2.1; see ``memcore.spec.reference.scan.selective_scan``."""
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              initial_state=initial_state, return_final_state=return_final_state)
    if not kernels_enabled(u):
        return _jax_ops().selective_scan(u, delta, A, B, C, **kw)
    from .selective_scan import selective_scan as kernel

    return kernel(u, delta, A, B, C, **kw, interpret=not _on_gpu(u))


def _ring_tail(ring, pos: int, length: int):
    """The last ``length`` positions before ``pos`` as [B, length, H, E], read from a ring
    [B, H, size, E] (position p in slot p % size); positions it does not hold read as zeros."""
    from memcore.backends.jax.banded import unroll_ring

    size = ring.shape[2]
    seq = unroll_ring(ring, pos, size)[:, :, max(0, size - length):]  # pos - min(size, len) ..
    seq = jnp.pad(seq, [(0, 0), (0, 0), (max(0, length - size), 0), (0, 0)])
    return jnp.swapaxes(seq, 1, 2)


def windowed_attention(q, k, v, window=None, fading_k=None, fading_v=None, initial_state=None,
                       return_final_state=False):
    """DESIGN 2.3 raw and fading sources; same signature, state and result as
    ``memcore.spec.reference.ops.windowed_attention``."""
    if not kernels_enabled(q):
        return _jax_ops().windowed_attention(q, k, v, window, fading_k, fading_v,
                                             initial_state, return_final_state)
    from memcore.backends.jax.banded import refill_ring
    from memcore.spec.validate import check_attention_args

    from .bmojo_attention import bmojo_attention

    check_attention_args(q, k, v, fading_k, fading_v, window, initial_state, streaming=False)
    fading = fading_k is not None
    T = q.shape[1]
    pos = 0 if initial_state is None else int(initial_state["pos"])
    # earlier keys the queries can still reach: W raw, 2W with the fading window, all if None
    reach = pos if window is None else min(pos, 2 * window if fading else window)
    seqs = {"k": k, "v": v}
    if fading:
        seqs.update(fk=fading_k, fv=fading_v)
    if reach > 0:
        for name in seqs:
            ring = initial_state[name]
            prev = (jnp.swapaxes(ring, 1, 2) if window is None  # a KV cache in position order
                    else _ring_tail(ring, pos, reach))
            seqs[name] = jnp.concatenate([prev.astype(q.dtype), seqs[name]], axis=1)
    o = bmojo_attention(q, seqs["k"], seqs["v"], window, seqs.get("fk"), seqs.get("fv"),
                        interpret=not _on_gpu(q))
    if not return_final_state:
        return o
    acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    new = {"pos": pos + T}
    for name, seq in seqs.items():
        seq = jnp.swapaxes(seq.astype(acc), 1, 2)  # [B, H, reach + T, E]
        if window is None:
            new[name] = seq
        else:
            size = 2 * window if name in ("fk", "fv") else window
            new[name] = refill_ring(seq, pos - reach, pos + T, size)
    return o, new


def bmojo_attention(q, k, v, window, fading_k=None, fading_v=None, store_k=None, store_v=None,
                    store_pos=None, chunk=None, pos=0, key_start=0):
    """All three sources; see ``memcore.kernels.pallas.bmojo_attention.bmojo_attention``. The
    JAX backend has no store-source twin, so off the kernels this runs the banded plain-JAX
    ``bmojo_attention_ref``."""
    from . import bmojo_attention as mod

    if not kernels_enabled(q):
        mod._check(q, k, v, window, fading_k, fading_v, store_k, store_v, store_pos, chunk, pos,
                   key_start)
        return mod.bmojo_attention_ref(q, k, v, window, fading_k, fading_v, store_k, store_v,
                                       store_pos, chunk if store_k is not None else None, pos,
                                       key_start=key_start)
    return mod.bmojo_attention(q, k, v, window, fading_k, fading_v, store_k, store_v, store_pos,
                               chunk, pos, key_start=key_start, interpret=not _on_gpu(q))
