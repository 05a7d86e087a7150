"""Argument checks on arrays, shared by the reference, both backends and ``memcore.ops``.

Each check reads only shapes and dtype kinds, so it runs on numpy, torch and JAX arrays (JAX
tracers included) and raises an error naming the argument, what was expected and what came.
"""

from __future__ import annotations

import array_api_compat


def is_floating(a) -> bool:
    return array_api_compat.array_namespace(a).isdtype(a.dtype, "real floating")


def is_integral(a) -> bool:
    return array_api_compat.array_namespace(a).isdtype(a.dtype, "integral")


def check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, *,
                    streaming: bool) -> None:
    """2.1: shapes of the selective scan's arguments (channel-major, as mamba-ssm)."""
    where = "selective_state_update" if streaming else "selective_scan"
    lead = 2 if streaming else 3
    if u.ndim != lead:
        raise ValueError(f"{where}: u must be [batch, channels{'' if streaming else ', T'}], "
                         f"got shape {tuple(u.shape)}")
    Bt, Dc = u.shape[0], u.shape[1]
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"{where}: delta must have u's shape {tuple(u.shape)}, "
                         f"got {tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != Dc:
        raise ValueError(f"{where}: A must be [channels={Dc}, d_state], got {tuple(A.shape)}")
    N = A.shape[1]
    for name, arr in (("B", B), ("C", C)):
        ok_plain = arr.ndim == lead and arr.shape[0] == Bt and arr.shape[1] == N
        ok_group = (arr.ndim == lead + 1 and arr.shape[0] == Bt and arr.shape[2] == N
                    and Dc % arr.shape[1] == 0)
        tail = "" if streaming else ", T"
        if not (ok_plain or ok_group) or (not streaming and arr.shape[-1] != u.shape[-1]):
            raise ValueError(f"{where}: {name} must be [batch={Bt}, d_state={N}{tail}] or "
                             f"[batch, groups dividing {Dc}, d_state{tail}], "
                             f"got {tuple(arr.shape)}")
    for name, arr in (("D", D), ("delta_bias", delta_bias)):
        if arr is not None and tuple(arr.shape) != (Dc,):
            raise ValueError(f"{where}: {name} must be [channels={Dc}], got {tuple(arr.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"{where}: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bt, Dc, N):
        raise ValueError(f"{where}: initial_state must be [batch={Bt}, channels={Dc}, "
                         f"d_state={N}], got {tuple(initial_state.shape)}")


def check_leaky_args(k, log_decay, state, *, streaming: bool) -> None:
    """2.2: shapes of the leaky average's arguments."""
    where = "leaky_average_step" if streaming else "leaky_average"
    want = "[batch, heads, head_dim]" if streaming else "[batch, T, heads, head_dim]"
    if k.ndim != (3 if streaming else 4):
        raise ValueError(f"{where}: k must be {want}, got shape {tuple(k.shape)}")
    H, E = k.shape[-2], k.shape[-1]
    if tuple(log_decay.shape) != (H,):
        raise ValueError(f"{where}: log_decay must be [heads={H}], got {tuple(log_decay.shape)}")
    if state is not None and tuple(state.shape) != (k.shape[0], H, E):
        raise ValueError(f"{where}: initial_state must be [batch={k.shape[0]}, heads={H}, "
                         f"head_dim={E}], got {tuple(state.shape)}")


def check_windowed_readout_args(q, k, v, fading_k, fading_v, window, state, *,
                                streaming: bool) -> None:
    """2.3: shapes of the windowed readout's arguments and their agreement with the state."""
    where = "windowed_readout_step" if streaming else "windowed_readout"
    shape = tuple(q.shape)
    for name, a in (("k", k), ("v", v), ("fading_k", fading_k), ("fading_v", fading_v)):
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"{where}: {name} must have q's shape {shape}, got {tuple(a.shape)}")
    if q.ndim != (3 if streaming else 4):
        raise ValueError(f"{where}: q must be {'[B, H, E]' if streaming else '[B, T, H, E]'}, "
                         f"got {shape}")
    if (fading_k is None) != (fading_v is None):
        raise ValueError(f"{where}: give both fading_k and fading_v, or neither")
    if fading_k is not None and window is None:
        raise ValueError(f"{where}: window must be an int when fading keys are given, got None")
    if state is not None and (fading_k is not None) != ("fk" in state):
        raise ValueError(f"{where}: initial_state {'lacks' if fading_k is not None else 'has'} "
                         f"fading rings; build it with windowed_readout_state(..., "
                         f"fading={fading_k is not None})")


def check_associative_readout_args(k, v) -> None:
    """2.5: keys (which double as queries) and values, [B, T, H, E] of one shape."""
    if k.ndim != 4 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"associative_readout: k and v must be [B, T, H, E] of one shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")


def check_persistent_readout_args(k, mem_k, mem_v) -> None:
    """2.6: keys [..., H, E] and the learned slots mem_k, mem_v [H, P, E]."""
    H, E = k.shape[-2], k.shape[-1]
    if mem_k.ndim != 3 or tuple(mem_k.shape[::2]) != (H, E) or tuple(mem_v.shape) != tuple(
            mem_k.shape):
        raise ValueError(f"persistent_readout: mem_k and mem_v must be [H={H}, P, E={E}], got "
                         f"{tuple(mem_k.shape)} and {tuple(mem_v.shape)}")


def check_layer_input(spec, x, *, streaming: bool, name: str) -> None:
    """A layer's input: [batch, T, d_model] (or [batch, d_model] streaming), floating."""
    nd = 2 if streaming else 3
    want = "[batch, d_model]" if streaming else "[batch, T, d_model]"
    if x.ndim != nd:
        raise ValueError(f"{name} must be {want} with d_model={spec.d_model}, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[-1] != spec.d_model:
        raise ValueError(f"{name} has width {x.shape[-1]}, expected d_model={spec.d_model} "
                         f"(shape {tuple(x.shape)})")
    if not streaming and x.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got T={x.shape[1]}")
    if not is_floating(x):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")


def check_tokens(spec, tokens, *, streaming: bool) -> None:
    """A model's input: [batch, T] (or [batch] streaming) integer token ids."""
    nd = 1 if streaming else 2
    name = "tokens_t" if streaming else "tokens"
    want = "[batch]" if streaming else "[batch, T]"
    if tokens.ndim != nd:
        raise ValueError(f"{name} must be {want} integer token ids, got shape "
                         f"{tuple(tokens.shape)}")
    if not is_integral(tokens):
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if not streaming and tokens.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got T=0")
