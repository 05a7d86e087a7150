"""Argument checks on arrays, shared by the reference, both backends and ``memcore.ops``.

Each check reads only shapes and dtype kinds, so it runs on numpy, torch and JAX arrays (JAX
tracers included) and raises an error naming the argument, what was expected and what came.
"""

from __future__ import annotations

import numbers

import array_api_compat


def is_floating(a) -> bool:
    dt = a.dtype
    # Fast paths (these checks run at every step): torch dtypes say it, numpy's and JAX's have
    # a kind; anything else (bfloat16 in JAX is kind "V") asks the array's namespace.
    flag = getattr(dt, "is_floating_point", None)
    if isinstance(flag, bool):
        return flag
    kind = getattr(dt, "kind", None)
    if kind in ("f", "i", "u", "b", "c"):
        return kind == "f"
    # ml_dtypes' float types (numpy bfloat16, float8_*) have kind "V", which numpy's isdtype
    # refuses to read.
    if str(getattr(dt, "name", "")).startswith(("bfloat16", "float8", "float6", "float4")):
        return True
    try:
        return bool(array_api_compat.array_namespace(a).isdtype(dt, "real floating"))
    except TypeError:
        return False


def is_integral(a) -> bool:
    kind = getattr(a.dtype, "kind", None)
    if kind in ("f", "i", "u", "b", "c"):
        return kind in ("i", "u")
    return array_api_compat.array_namespace(a).isdtype(a.dtype, "integral")


def library(a) -> str:
    """The array library of ``a``: "numpy", "torch", "jax" or the module it comes from."""
    if array_api_compat.is_torch_array(a):
        return "torch"
    if array_api_compat.is_jax_array(a):
        return "jax"
    if array_api_compat.is_numpy_array(a):
        return "numpy"
    return type(a).__module__.split(".")[0]


def check_array(where: str, name: str, a, *, kind: str = "floating", optional: bool = False,
                like=None, like_name: str = "") -> None:
    """``a`` is an array (None only if ``optional``) of ``like``'s library, with a
    floating-point dtype (``kind="floating"``), an integer one ("integral") or any ("any")."""
    if a is None:
        if optional:
            return
        raise TypeError(f"{where}: {name} must be an array, got None")
    _check_is_array(f"{where}: {name}", a)
    if like is not None and library(a) != library(like):
        raise TypeError(f"{where}: {name} is a {library(a)} array but {like_name} is a "
                        f"{library(like)} array; pass the arrays of one call from one library")
    if kind == "floating" and not is_floating(a):
        raise TypeError(f"{where}: {name} must be a floating-point array, got dtype {a.dtype}")
    if kind == "integral" and not is_integral(a):
        raise TypeError(f"{where}: {name} must be an integer array, got dtype {a.dtype}")


def check_arrays(where: str, arrays: dict, *, optional=(), kinds=None) -> None:
    """``check_array`` for each ``name -> array`` of ``arrays``, all of the first one's
    library."""
    first = next(((n, a) for n, a in arrays.items() if a is not None), (None, None))
    kinds = kinds or {}
    for name, a in arrays.items():
        check_array(where, name, a, kind=kinds.get(name, "floating"), optional=name in optional,
                    like=first[1] if name != first[0] else None, like_name=first[0])


def check_count(where: str, name: str, value, *, minimum: int = 1,
                allow_none: bool = False) -> None:
    """An op's integer argument (``window``, ``capacity``, ``n``): an int >= ``minimum``, or
    None where that means unbounded."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{where}: {name} must be {expected}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")


def check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, *,
                    streaming: bool) -> None:
    """2.1: shapes of the selective scan's arguments (channel-major, as mamba-ssm)."""
    where = "selective_state_update" if streaming else "selective_scan"
    check_arrays(where, {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z,
                         "delta_bias": delta_bias,
                         ("state" if streaming else "initial_state"): initial_state},
                 optional=("D", "z", "delta_bias", "initial_state", "state"))
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
        raise ValueError(f"{where}: {'state' if streaming else 'initial_state'} must be "
                         f"[batch={Bt}, channels={Dc}, d_state={N}], got "
                         f"{tuple(initial_state.shape)}")


def check_leaky_args(k, log_decay, state, *, streaming: bool) -> None:
    """2.2: shapes of the leaky average's arguments."""
    where = "leaky_average_step" if streaming else "leaky_average"
    names = ("k_t", "state") if streaming else ("k", "initial_state")
    check_arrays(where, {names[0]: k, "log_decay": log_decay, names[1]: state},
                 optional=(names[1],))
    want = "[batch, heads, head_dim]" if streaming else "[batch, T, heads, head_dim]"
    if k.ndim != (3 if streaming else 4):
        raise ValueError(f"{where}: {names[0]} must be {want}, got shape {tuple(k.shape)}")
    H, E = k.shape[-2], k.shape[-1]
    if tuple(log_decay.shape) != (H,):
        raise ValueError(f"{where}: log_decay must be [heads={H}], got {tuple(log_decay.shape)}")
    if state is not None and tuple(state.shape) != (k.shape[0], H, E):
        raise ValueError(f"{where}: {names[1]} must be [batch={k.shape[0]}, heads={H}, "
                         f"head_dim={E}], got {tuple(state.shape)}")


def check_windowed_readout_args(q, k, v, fading_k, fading_v, window, state, *,
                                streaming: bool) -> None:
    """2.3: shapes of the windowed readout's arguments and their agreement with the state."""
    where = "windowed_readout_step" if streaming else "windowed_readout"
    t = "_t" if streaming else ""
    check_arrays(where, {"q" + t: q, "k" + t: k, "v" + t: v, "fading_k" + t: fading_k,
                         "fading_v" + t: fading_v},
                 optional=("fading_k" + t, "fading_v" + t))
    check_count(where, "window", window, allow_none=True)
    shape = tuple(q.shape)
    if q.ndim != (3 if streaming else 4):
        raise ValueError(f"{where}: q{t} must be {'[B, H, E]' if streaming else '[B, T, H, E]'}"
                         f", got shape {shape}")
    for name, a in (("k", k), ("v", v), ("fading_k", fading_k), ("fading_v", fading_v)):
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"{where}: {name}{t} must have q{t}'s shape {shape}, got "
                             f"{tuple(a.shape)}")
    if (fading_k is None) != (fading_v is None):
        raise ValueError(f"{where}: give both fading_k and fading_v, or neither")
    if fading_k is not None and window is None:
        raise ValueError(f"{where}: window must be an int when fading keys are given, got None")
    if streaming and state is None:
        raise TypeError(f"{where}: state must be a state dict (from windowed_readout_state or "
                        f"a previous call), got None")
    if state is not None:
        check_readout_state(where, "state" if streaming else "initial_state", state, q,
                            window, fading_k is not None)


def check_readout_state(where: str, name: str, state, q, window, fading: bool) -> None:
    """A windowed readout's state: ``pos`` and rings of q's batch, heads and head width."""
    if not isinstance(state, dict) or "pos" not in state or "k" not in state or "v" not in state:
        raise TypeError(f"{where}: {name} must be a state dict with 'pos', 'k' and 'v' (from "
                        f"windowed_readout_state or a previous call), got "
                        f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    pos = state["pos"]
    if array_api_compat.is_array_api_obj(pos) and not isinstance(pos, numbers.Integral):
        if pos.ndim != 0 or not is_integral(pos):
            raise ValueError(f"{where}: {name}['pos'] must be a non-negative int, got {pos!r}")
        pos = None  # a position array (under jit, a tracer): its value is not read here
    elif isinstance(pos, bool) or not isinstance(pos, numbers.Integral) or pos < 0:
        raise ValueError(f"{where}: {name}['pos'] must be a non-negative int, got {pos!r}")
    if fading != ("fk" in state):
        raise ValueError(f"{where}: {name} {'lacks' if fading else 'has'} "
                         f"fading rings; build it with windowed_readout_state(..., "
                         f"fading={fading})")
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    rings = {"k": window, "v": window}
    if fading:
        rings.update(fk=2 * window, fv=2 * window)
    for key, slots in rings.items():
        a = state[key]
        check_array(where, f"{name}[{key!r}]", a, like=q, like_name="q")
        want = (B, H, slots, E)
        got = tuple(a.shape)
        if slots is None:  # a KV cache holding the pos tokens seen so far
            held = pos if pos is not None else (got[2] if len(got) > 2 else 0)
            want = (B, H, held, E)
        if got != want:
            raise ValueError(f"{where}: {name}[{key!r}] has shape {got}, expected {want} "
                             f"(batch, heads, slots, head_dim)")


def check_associative_readout_args(k, v) -> None:
    """2.5: keys (which double as queries) and values, [B, T, H, E] of one shape."""
    check_arrays("associative_readout", {"k": k, "v": v})
    if k.ndim != 4 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"associative_readout: k and v must be [B, T, H, E] of one shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")


def check_persistent_readout_args(k, mem_k, mem_v) -> None:
    """2.6: keys [..., H, E] and the learned slots mem_k, mem_v [H, P, E]."""
    check_arrays("persistent_readout", {"k": k, "mem_k": mem_k, "mem_v": mem_v})
    if k.ndim < 2:
        raise ValueError(f"persistent_readout: k must be [..., H, E], got shape {tuple(k.shape)}")
    H, E = k.shape[-2], k.shape[-1]
    if mem_k.ndim != 3 or tuple(mem_k.shape[::2]) != (H, E) or tuple(mem_v.shape) != tuple(
            mem_k.shape):
        raise ValueError(f"persistent_readout: mem_k and mem_v must be [H={H}, P, E={E}], got "
                         f"{tuple(mem_k.shape)} and {tuple(mem_v.shape)}")


def check_store_entries(where: str, name: str, entries) -> None:
    """2.4: an entry set: keys and values [B, H, S, E], scores [B, S] (floating), positions
    [B, S] (integers)."""
    fields = ("k", "v", "score", "pos")
    if not isinstance(entries, dict) or set(entries) != set(fields):
        got = sorted(entries) if isinstance(entries, dict) else type(entries).__name__
        raise TypeError(f"{where}: {name} must be an entry set, a dict with keys "
                        f"{list(fields)}, got {got}")
    check_arrays(where, {f"{name}[{f!r}]": entries[f] for f in fields},
                 kinds={f"{name}['pos']": "integral"})
    k = entries["k"]
    if k.ndim != 4 or tuple(entries["v"].shape) != tuple(k.shape):
        raise ValueError(f"{where}: {name}['k'] and {name}['v'] must be [B, H, S, E] of one "
                         f"shape, got {tuple(k.shape)} and {tuple(entries['v'].shape)}")
    want = (k.shape[0], k.shape[2])
    for f in ("score", "pos"):
        if tuple(entries[f].shape) != want:
            raise ValueError(f"{where}: {name}[{f!r}] must be [B, S] = {want}, got "
                             f"{tuple(entries[f].shape)}")


def check_innovation_args(x, s_prev, pred_weight) -> None:
    """2.4: innovation scores' x and s_prev [B, T, D], pred_weight [D, D] (both None: no
    predictor)."""
    where = "innovation_scores"
    check_arrays(where, {"x": x, "s_prev": s_prev, "pred_weight": pred_weight},
                 optional=("s_prev", "pred_weight"))
    if x.ndim != 3:
        raise ValueError(f"{where}: x must be [B, T, D], got shape {tuple(x.shape)}")
    if (s_prev is None) != (pred_weight is None):
        raise ValueError(f"{where}: give both s_prev and pred_weight, or neither (no "
                         f"predictor)")
    D = x.shape[-1]
    if s_prev is not None and tuple(s_prev.shape) != tuple(x.shape):
        raise ValueError(f"{where}: s_prev must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(s_prev.shape)}")
    if pred_weight is not None and tuple(pred_weight.shape) != (D, D):
        raise ValueError(f"{where}: pred_weight must be [{D}, {D}], got "
                         f"{tuple(pred_weight.shape)}")


def check_param_arrays(params: dict) -> None:
    """Every value of a parameter dict is an array (of any library) with a floating-point
    dtype."""
    for name, value in params.items():
        _check_is_array(f"params[{name!r}]", value)
        if not is_floating(value):
            raise TypeError(f"params[{name!r}] must be a floating-point array, got dtype "
                            f"{value.dtype}")


def check_layer_input(spec, x, *, streaming: bool, name: str, empty_ok: bool = False) -> None:
    """A layer's input: [batch, T, d_model] (or [batch, d_model] streaming) with batch >= 1,
    floating. T = 0 passes with ``empty_ok`` (the realized layers return an empty output)."""
    _check_is_array(name, x)
    nd = 2 if streaming else 3
    want = "[batch, d_model]" if streaming else "[batch, T, d_model]"
    if x.ndim != nd:
        raise ValueError(f"{name} must be {want} with d_model={spec.d_model}, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[-1] != spec.d_model:
        raise ValueError(f"{name} has width {x.shape[-1]}, expected d_model={spec.d_model} "
                         f"(shape {tuple(x.shape)})")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has batch size 0; a layer runs on at least one sequence "
                         f"(shape {tuple(x.shape)})")
    if not (streaming or empty_ok) and x.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got T={x.shape[1]}")
    if not is_floating(x):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_state_arrays(state, name: str = "state") -> None:
    """Every array slot of a state dict (a model's: of each dict in its ``layers`` and ``ffn``
    tuples) holds an array; ``pos``, ``spec_id`` and anything that is no dict are left to the
    trees' state checks."""
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        if key in ("pos", "spec_id"):
            continue
        if key in ("layers", "ffn") and isinstance(value, (tuple, list)):
            for i, sub in enumerate(value):
                check_state_arrays(sub, f"{name}[{key!r}][{i}]")
        else:
            _check_is_array(f"{name}[{key!r}]", value)


def _check_is_array(name: str, a) -> None:
    # Python and numpy scalars pass is_array_api_obj; no argument checked here may be one.
    if not array_api_compat.is_array_api_obj(a) or isinstance(a, (bool, int, float, complex)):
        raise TypeError(f"{name} must be an array (numpy, torch or JAX), got "
                        f"{type(a).__name__}")


def check_tokens(spec, tokens, *, streaming: bool, empty_ok: bool = False) -> None:
    """A model's input: [batch, T] (or [batch] streaming) integer token ids, batch >= 1. T = 0
    passes with ``empty_ok`` (the realized models return empty logits)."""
    name = "tokens_t" if streaming else "tokens"
    _check_is_array(name, tokens)
    nd = 1 if streaming else 2
    want = "[batch]" if streaming else "[batch, T]"
    if tokens.ndim != nd:
        raise ValueError(f"{name} must be {want} integer token ids, got shape "
                         f"{tuple(tokens.shape)}")
    if not is_integral(tokens):
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[0] < 1:
        raise ValueError(f"{name} has batch size 0; a model runs on at least one sequence "
                         f"(shape {tuple(tokens.shape)})")
    if not (streaming or empty_ok) and tokens.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got T=0")
