"""Bytes a spec's parameters and streaming state take, and the allocation limit checked before
either is allocated.

Each count is a sum of terms; a term is a product of spec arguments (and the batch size, and
``max_len`` for a growing cache), so an allocation beyond the limit is reported with the argument
of the largest term that is largest in it: ``window=1000000000000 asks for a state of ...``.

The limit (default 16 GiB) applies to the parameters of one spec and to one state, separately. It
is, in order: the value given to ``set_allocation_limit`` (``memcore.set_allocation_limit``), the
environment variable ``MEMCORE_MAX_ALLOC_BYTES``, the default. ``set_allocation_limit(None)``
goes back to the environment or the default.
"""

from __future__ import annotations

import os

from .arguments import choice_arg, int_arg
from .layers import BMojo, BMojoF, Mamba, Mosaic, Persistent, Transformer
from .model import Model

DEFAULT_LIMIT = 16 * 2**30
ENV = "MEMCORE_MAX_ALLOC_BYTES"
_limit: int | None = None

__all__ = ["param_bytes", "state_bytes", "check_allocation", "set_allocation_limit",
           "allocation_limit", "format_bytes", "growing", "layout_bytes", "check_layout",
           "DEFAULT_LIMIT", "ENV"]


# --- the limit --------------------------------------------------------------------------------

def set_allocation_limit(limit: int | None) -> None:
    """Set the largest parameter or state allocation (bytes) that ``init``, ``init_state`` and
    ``realize`` accept; None: ``MEMCORE_MAX_ALLOC_BYTES`` or the default (16 GiB)."""
    global _limit
    int_arg("set_allocation_limit", "limit", limit, minimum=1, allow_none=True)
    _limit = limit


def allocation_limit() -> int:
    """The limit in force, in bytes."""
    if _limit is not None:
        return _limit
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_LIMIT
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{ENV} must be a positive integer number of bytes, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{ENV} must be a positive integer number of bytes, got {raw!r}")
    return value


def format_bytes(n: int) -> str:
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30),
                       ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# --- terms ------------------------------------------------------------------------------------
# A term is (elements, factors, index): ``factors`` are the (argument, value) pairs whose product
# (times constants) is ``elements``; ``index`` marks integer arrays (store positions).

def _mamba_params(s: Mamba):
    D, Di, N, K, R = s.d_model, s.d_inner, s.d_state, s.d_conv, s.dt_rank_value
    inner = (("d_model", D), ("expand", s.expand))
    rank = ("d_model", D) if s.dt_rank == "auto" else ("dt_rank", R)
    return [
        (2 * Di * D + D * Di + 2 * Di, inner),  # in_proj, out_proj, dt_proj.bias, D
        (Di * (K + 1), inner + (("d_conv", K),)),  # conv1d.weight, conv1d.bias
        (2 * Di * R, inner + (rank,)),  # x_proj's dt rows, dt_proj.weight
        (3 * Di * N, inner + (("d_state", N),)),  # x_proj's B and C rows, A_log
    ] + ([(R + 2 * N, (rank, ("d_state", N)))] if s.inner_norm_eps is not None else [])


def _layer_params(s):
    D = s.d_model
    width = (("d_model", D),)
    if isinstance(s, Mamba):
        return _mamba_params(s)
    if isinstance(s, Transformer):  # q, o [D, D]; k, v [n_kv_heads * head_dim, D]
        return [(2 * D * D + 2 * s.n_kv_heads * s.head_dim * D, width)]
    if isinstance(s, BMojoF):  # also BMojo
        n = 4 + (0 if s.tie_fading or not s.fading else 2) + (
            1 if isinstance(s, BMojo) and s.fading else 0)
        terms = [(n * D * D, width)]
        return terms + (_mamba_params(s.fading_block) if s.fading else [])
    if isinstance(s, Mosaic):
        return [(3 * D * D + 4 * s.n_heads, width)]
    if isinstance(s, Persistent):
        return [(2 * D * D + 3 * s.n_heads, width),
                (2 * s.slots * D, width + (("slots", s.slots),))]
    raise TypeError(f"spec must be a memcore layer or model spec, got {s!r}")


def _param_terms(spec):
    if not isinstance(spec, Model):
        return [(n, f, False) for n, f in _layer_params(spec)]
    D, V = spec.d_model, spec.vocab_size
    width = (("d_model", D),)
    heads = 1 if spec.tie_embeddings else 2  # the embedding, and an untied head
    terms = [(heads * V * D, (("vocab_size", V),) + width, False), (D, width, False)]
    for i, layer in enumerate(spec.layers):
        pre = f"layers[{i}]."
        terms += [(n, _prefixed(pre, f), False) for n, f in _layer_params(layer)]
        terms.append((D * (1 if spec.ffn is None else 2), width, False))  # norm1, norm2
        if spec.short_conv:
            terms.append((D * spec.short_conv, width + (("short_conv", spec.short_conv),),
                          False))
        if spec.ffn in ("mlp", "swiglu"):
            wide = (("mlp_ratio", spec.mlp_ratio),) if spec.d_ff is None else (
                ("d_ff", spec.d_ff),)
            n = 2 if spec.ffn == "mlp" else 3
            terms.append((n * spec.ffn_width * D, width + wide, False))
        elif spec.ffn is not None:
            terms += [(n, _prefixed("ffn.", f), False) for n, f in _layer_params(spec.ffn)]
    return terms


def _prefixed(prefix, factors):
    return tuple((prefix + name, value) for name, value in factors)


def _entries(B, H, n, E, factors):
    """An eidetic store's entry set of n slots: keys, values and scores, then positions."""
    return [(B * n * (2 * H * E + 1), factors, False), (B * n, factors, True)]


def _layer_state(s, batch: int, max_len):
    B = (("batch", batch),)
    if isinstance(s, Mamba):
        D, Di = s.d_model, s.d_inner
        inner = B + (("d_model", D), ("expand", s.expand))
        return [(batch * Di * (s.d_conv - 1), inner + (("d_conv", s.d_conv),), False),
                (batch * Di * s.d_state, inner + (("d_state", s.d_state),), False)]
    width = B + (("d_model", s.d_model),)
    if isinstance(s, (Transformer, BMojoF)):
        ro = s.readout
        H, E, W = ro.n_heads, ro.head_dim, ro.window
        raw = (("window", W),) if W is not None else (("max_len", max_len or 0),)
        kv = getattr(s, "n_kv_heads", H)  # the rings hold the key/value heads
        terms = [(2 * batch * kv * raw[0][1] * E, width + raw, False)]
        if ro.fading:
            terms.append((4 * batch * H * W * E, width + (("window", W),), False))
            terms += _layer_state(s.fading_block, batch, max_len)
        st = ro.store
        if st is not None:
            terms.append((batch * s.d_model, width, False))
            terms += _entries(batch, H, st.select, E, width + (("select", st.select),))
            terms += _entries(batch, H, st.capacity, E, width + (("capacity", st.capacity),))
        return terms
    if isinstance(s, Mosaic):
        ro = s.readout
        slots = (("capacity", ro.capacity),) if ro.capacity is not None else (
            ("max_len", max_len or 0),)
        return [(3 * batch * s.d_model, width, False),
                (2 * batch * s.d_model * slots[0][1], width + slots, False)]
    if isinstance(s, Persistent):
        return [(batch * s.d_model, width, False)]
    raise TypeError(f"spec must be a memcore layer or model spec, got {s!r}")


def _state_terms(spec, batch: int, max_len):
    if not isinstance(spec, Model):
        return _layer_state(spec, batch, max_len)
    terms = []
    for i, layer in enumerate(spec.layers):
        terms += [(n, _prefixed(f"layers[{i}].", f), ix)
                  for n, f, ix in _layer_state(layer, batch, max_len)]
        if isinstance(spec.ffn, Persistent):
            terms += [(n, _prefixed(f"ffn[{i}].", f), ix)
                      for n, f, ix in _layer_state(spec.ffn, batch, max_len)]
        if spec.short_conv:  # the convolution's last K - 1 inputs
            K, D = spec.short_conv, spec.d_model
            terms.append((batch * (K - 1) * D, (("batch", batch), ("d_model", D),
                                                ("short_conv", K)), False))
    return terms


def _total(terms, dtype_bytes: int, index_bytes: int) -> int:
    return sum(n * (index_bytes if ix else dtype_bytes) for n, _, ix in terms)


def _check_counts(where: str, batch, max_len, dtype_bytes, index_bytes) -> None:
    int_arg(where, "batch", batch, minimum=1)
    int_arg(where, "max_len", max_len, minimum=0, allow_none=True)
    int_arg(where, "dtype_bytes", dtype_bytes, minimum=1)
    int_arg(where, "index_bytes", index_bytes, minimum=1)


def _check_spec(where: str, spec) -> None:
    if not isinstance(spec, (Model, Transformer, Mamba, BMojoF, Mosaic, Persistent)):
        raise TypeError(f"spec must be a memcore layer or model spec, got {spec!r} ({where})")


# --- the public counts ------------------------------------------------------------------------

def param_bytes(spec, dtype_bytes: int = 4) -> int:
    """Bytes of ``memcore.init(spec)``'s arrays for a float dtype of ``dtype_bytes`` bytes."""
    _check_spec("param_bytes", spec)
    int_arg("param_bytes", "dtype_bytes", dtype_bytes, minimum=1)
    return _total(_param_terms(spec), dtype_bytes, 0)


def state_bytes(spec, batch: int = 1, max_len: int | None = None, dtype_bytes: int = 4,
                index_bytes: int = 8) -> int:
    """Bytes of the arrays of a state for ``batch`` sequences: floats of ``dtype_bytes`` (the
    accumulation dtype: 4, or 8 for float64), store positions of ``index_bytes`` (8 in the
    reference and torch, 4 in JAX). A growing cache (transformer with window=None, mosaic with
    capacity=None) counts ``max_len`` slots (none when max_len is None, as a fresh state holds)."""
    _check_spec("state_bytes", spec)
    _check_counts("state_bytes", batch, max_len, dtype_bytes, index_bytes)
    return _total(_state_terms(spec, batch, max_len), dtype_bytes, index_bytes)


def _culprit(terms, dtype_bytes: int, index_bytes: int) -> tuple[str, int]:
    n, factors, ix = max(terms, key=lambda t: t[0] * (index_bytes if t[2] else dtype_bytes))
    return max(factors, key=lambda f: f[1])


def check_allocation(spec, *, batch: int = 1, max_len: int | None = None, what: str = "both",
                     dtype_bytes: int = 4, index_bytes: int = 8) -> None:
    """Raise a ValueError before a parameter set (``what="params"``) or a state
    (``what="state"``, for ``batch`` sequences and ``max_len`` slots of a growing cache) of
    ``spec`` would take more than the allocation limit; ``what="both"`` checks the two. The
    message names the argument of the largest contribution and the bytes asked for."""
    _check_spec("check_allocation", spec)
    choice_arg("check_allocation", "what", what, ("state", "params", "both"))
    _check_counts("check_allocation", batch, max_len, dtype_bytes, index_bytes)
    limit = allocation_limit()
    checks = []
    if what in ("params", "both"):
        checks.append(("parameters", _param_terms(spec), ""))
    if what in ("state", "both"):
        tail = f", batch {batch}" + ("" if max_len is None else f", max_len {max_len}")
        checks.append(("a state", _state_terms(spec, batch, max_len), tail))
    for noun, terms, tail in checks:
        total = _total(terms, dtype_bytes, index_bytes)
        if total > limit:
            name, value = _culprit(terms, dtype_bytes, index_bytes)
            raise ValueError(
                f"{spec.kind}: {name}={value} asks for {noun} of {format_bytes(total)} "
                f"({total} bytes{tail}), beyond the allocation limit of {format_bytes(limit)}; "
                f"raise it with memcore.set_allocation_limit(...) or {ENV}")



def growing(spec) -> bool:
    """Whether a state of ``spec`` holds a cache that grows with the stream (a transformer with
    window=None, a mosaic with capacity=None, or a model with such a layer)."""
    if isinstance(spec, Model):
        return any(growing(layer) for layer in spec.layers)
    return (isinstance(spec, Transformer) and spec.window is None) or (
        isinstance(spec, Mosaic) and spec.capacity is None)


def layout_bytes(spec, batch: int, T: int, pos: int = 0, dtype_bytes: int = 4) -> int:
    """Bytes of the chunk-aligned layout that the torch and JAX parallel forms build for a layer
    with an eidetic store (2.4): keys, values, scores and positions of every chunk that tokens
    pos .. pos+T-1 touch, in whole chunks. For a model, its largest layer's (layers run one
    after another); 0 without a store."""
    layers = spec.layers if isinstance(spec, Model) else (spec,)
    most = 0
    for s in layers:
        st = getattr(getattr(s, "readout", None), "store", None)
        if st is None or T == 0:
            continue
        C = st.chunk
        slots = (pos % C + T + C - 1) // C * C
        most = max(most, batch * slots * ((2 * s.d_model + 1) * dtype_bytes + 8))
    return most


def check_layout(spec, *, batch: int, T: int, pos: int = 0, dtype_bytes: int = 4) -> None:
    """Raise a ValueError, naming ``chunk``, before a parallel form lays out more chunk slots
    than the allocation limit allows (a chunk far longer than the sequences)."""
    total = layout_bytes(spec, batch, T, pos, dtype_bytes)
    limit = allocation_limit()
    if total > limit:
        layers = spec.layers if isinstance(spec, Model) else (spec,)
        i, s = max(((i, s) for i, s in enumerate(layers)
                    if getattr(getattr(s, "readout", None), "store", None) is not None),
                   key=lambda p: p[1].store.chunk)
        name = f"layers[{i}].chunk" if isinstance(spec, Model) else "chunk"
        raise ValueError(
            f"{spec.kind}: {name}={s.store.chunk} asks for a chunk layout of "
            f"{format_bytes(total)} ({total} bytes, batch {batch}, {T} tokens) in the parallel "
            f"form, beyond the allocation limit of {format_bytes(limit)}; use a shorter chunk, "
            f"or raise the limit with memcore.set_allocation_limit(...) or {ENV}")
