"""The Pallas windowed readout's argument checks: shapes, positions and packed rows, each
error naming the argument and what was expected."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_scalar(name, value):
    """An int >= 0, or a 0-d integer array (a traced position inside jit)."""
    if isinstance(value, bool):
        raise TypeError(f"windowed_readout: {name} must be an int >= 0, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"windowed_readout: {name} must be an int >= 0, got {value}")
        return
    if not (hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)
            and jnp.ndim(value) == 0):
        raise TypeError(f"windowed_readout: {name} must be an int >= 0 or a 0-d integer "
                        f"array, got {value!r}")


def check(q, k, v, window, fading_k, fading_v, store_k, store_v, store_pos, chunk, pos,
           key_start=0):
    if q.ndim != 4:
        raise ValueError(f"windowed_readout: q must be [B, Tq, H, E], got shape {tuple(q.shape)}")
    B, Tq, H, E = q.shape
    if k.ndim != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, H, E) or k.shape[1] < Tq:
        raise ValueError(f"windowed_readout: k must be [B={B}, Tk >= {Tq}, H={H}, E={E}], got "
                         f"{tuple(k.shape)}")
    for name, a in (("v", v), ("fading_k", fading_k), ("fading_v", fading_v)):
        if a is not None and tuple(a.shape) != tuple(k.shape):
            raise ValueError(f"windowed_readout: {name} must have k's shape {tuple(k.shape)}, "
                             f"got {tuple(a.shape)}")
    if (fading_k is None) != (fading_v is None):
        raise ValueError("windowed_readout: give both fading_k and fading_v, or neither")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"windowed_readout: window must be a positive int or None, got {window!r}")
    if (fading_k is not None or store_k is not None) and window is None:
        raise ValueError("windowed_readout: window must be an int when fading keys or a store "
                         "are given, got None")
    if Tq == 0:
        raise ValueError(f"windowed_readout: q must hold at least one query, got {tuple(q.shape)}")
    check_scalar("pos", pos)
    check_scalar("key_start", key_start)
    given = [a is not None for a in (store_k, store_v, store_pos)]
    if any(given) and not all(given):
        raise ValueError("windowed_readout: give store_k, store_v and store_pos together, "
                         "or none of them")
    if store_k is None:
        return
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"windowed_readout: chunk must be a positive int with a store, "
                         f"got {chunk!r}")
    if isinstance(pos, int):
        S = (pos + Tq - 1) // chunk - pos // chunk + 1  # chunks the queries fall in
    else:  # a run-time position: as many as any pos can need
        S = -(-(Tq + chunk - 1) // chunk)
    if store_pos.ndim != 3 or store_pos.shape[0] != B or store_pos.shape[1] < S:
        raise ValueError(f"windowed_readout: store_pos must be [B={B}, snapshots >= {S}, M], "
                         f"got {tuple(store_pos.shape)}")
    want = (B, H, store_pos.shape[1], store_pos.shape[2], E)
    for name, a in (("store_k", store_k), ("store_v", store_v)):
        if tuple(a.shape) != want:
            raise ValueError(f"windowed_readout: {name} must be [B, H, S, M, E] = {want}, got "
                             f"{tuple(a.shape)}")


def is_zero(value) -> bool:
    """Whether ``value`` is 0 as far as can be seen: an int, or a concrete 0-d array."""
    if isinstance(value, int):
        return value == 0
    try:
        return int(value) == 0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return False  # traced: cannot be shown to be 0


def check_cu_seqlens(cu_seqlens, q, k, store_k, pos, key_start):
    """What a packed row needs (the Triton kernel's rule): batch 1, the row's own keys from
    position 0, no store; cu_seqlens int [N + 1] and, where concrete, 0 = c_0 < ... < c_N =
    Tq. Raises a ValueError naming ``cu_seqlens``."""
    where = "windowed_readout"
    B, Tq = q.shape[0], q.shape[1]
    if store_k is not None or B != 1 or k.shape[1] != Tq or not is_zero(pos) or not is_zero(
            key_start):
        raise ValueError(f"{where}: cu_seqlens takes one packed row (batch 1) of its own keys "
                         f"(Tk = Tq) from pos=0 with key_start=0, without a store; got batch "
                         f"{B}, Tq={Tq}, Tk={k.shape[1]}, pos={pos!r}, key_start="
                         f"{key_start!r}, store {'given' if store_k is not None else 'none'}")
    if not hasattr(cu_seqlens, "dtype") or not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"{where}: cu_seqlens must be an int32 array [N + 1], got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    if cu_seqlens.ndim != 1 or not 2 <= cu_seqlens.shape[0] <= Tq + 1:
        raise ValueError(f"{where}: cu_seqlens must be [N + 1] with 1 <= N <= Tq={Tq}, got "
                         f"shape {tuple(cu_seqlens.shape)}")
    if isinstance(cu_seqlens, jax.core.Tracer):
        return  # the boundaries are known at run time only
    c = np.asarray(cu_seqlens)
    if c[0] != 0 or c[-1] != Tq or np.any(np.diff(c) <= 0):
        raise ValueError(f"{where}: cu_seqlens must rise strictly from 0 to Tq={Tq}, got "
                         f"{c.tolist()}")
