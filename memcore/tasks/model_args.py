"""What the task models of both backends share (no torch or JAX import): their argument checks,
the pass through their blocks, and the memory a model keeps per sequence, from its spec."""

from __future__ import annotations

from collections.abc import Callable

import memcore
from memcore.spec import sizes
from memcore.spec.model import Model


def check_task_model(cls: str, spec, params, seed: int, short_conv: int) -> dict:
    """The arguments of a task model (torch ``TaskLM`` or its JAX twin): a mixer-only model
    spec and a short-convolution width >= 0; returns the parameters (``memcore.init``'s when
    none are given)."""
    if not isinstance(spec, Model):
        raise TypeError(f"spec must be a memcore model spec, got {type(spec).__name__}")
    if spec.ffn is not None:
        raise ValueError(f"{cls} builds mixer-only blocks: spec.ffn must be None, "
                         f"got {spec.ffn!r}")
    if isinstance(short_conv, bool) or not isinstance(short_conv, int) or short_conv < 0:
        raise ValueError(f"short_conv must be an int >= 0 (0: none), got {short_conv!r}")
    return memcore.init(spec, seed) if params is None else params


def check_token_range(lo: int, hi: int, vocab: int) -> None:
    """Token ids from ``lo`` to ``hi`` (the smallest and largest given) must lie in
    [0, vocab)."""
    if lo < 0 or hi >= vocab:
        raise ValueError(f"tokens must lie in [0, vocab_size={vocab}), got values from "
                         f"{lo} to {hi}")


def run_blocks(model, h, norm: Callable, conv: Callable, mix: Callable) -> tuple:
    """The residual stream of a task model (``TaskLM`` or ``JaxTaskLM``, with its backend's
    ``norm(kind, x, w)`` and ``conv(x, w)``): for each block i, ``y, out_i = mix(mixer_i, g)``
    on g = conv(norm1_i(h)) (the convolution only with ``short_conv``), then h = h + y.
    Returns (h, [out_i for each block])."""
    outs = []
    for i, mixer in enumerate(model.mixers):
        g = norm(model.spec.norm, h, model.norms[i])
        if model.short_conv:
            g = conv(g, model.convs[i])
        y, out = mix(mixer, g)
        outs.append(out)
        h = h + y
    return h, outs


def forward_aux(mixer, g) -> tuple:
    """``run_blocks``' ``mix`` for training: (the mixer's output, its aux loss or None)."""
    y, _, aux = mixer.forward_aux(g)
    return y, aux


def sum_aux(auxes):
    """The blocks' aux losses summed in order (the bmojo layers' innovation losses), or None
    when no block has one."""
    total = None
    for a in auxes:
        if a is not None:
            total = a if total is None else total + a
    return total


def conv_state_bytes(model) -> int:
    """Bytes of the short convolutions' last K-1 inputs at float32, over all blocks."""
    return _conv_bytes(model.spec, model.short_conv)


def _conv_bytes(spec, short_conv: int) -> int:
    return spec.n_layers * (short_conv - 1) * spec.d_model * FLOAT_BYTES if short_conv else 0


FLOAT_BYTES = 4  # the task models keep their states in float32


def _filled(layer, seq_len: int) -> int | None:
    """The entries a growing cache holds after ``seq_len`` tokens: a full KV cache every token's
    key and value; Memory Mosaics' associative memory without a capacity every pair but the
    last (its look-ahead value is the next token's); None for a bounded state."""
    if layer.kind == "transformer" and layer.window is None:
        return seq_len
    if layer.kind == "mosaic" and layer.capacity is None:
        return max(seq_len - 1, 0)
    return None


def memory_bytes(spec, seq_len: int, short_conv: int = 0) -> int:
    """Bytes a task model (``TaskLM``, ``JaxTaskLM``) keeps per sequence at evaluation length
    ``seq_len``, from its spec: each mixer's streaming state (``memcore.spec.sizes.state_bytes``:
    recurrent state, windows, eidetic store and candidates, float32 with int64 store positions)
    with its growing cache filled to ``seq_len``, plus the short convolutions' last K-1 inputs.
    State + store + KV cache, as the B'MOJO paper counts memory."""
    if not isinstance(spec, Model):
        raise TypeError(f"memory_bytes: spec must be a memcore model spec, got "
                        f"{type(spec).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"memory_bytes: seq_len must be an int >= 0, got {seq_len!r}")
    states = sum(sizes.state_bytes(layer, 1, max_len=_filled(layer, seq_len),
                                   dtype_bytes=FLOAT_BYTES, index_bytes=8)
                 for layer in spec.layers)
    return states + _conv_bytes(spec, short_conv)
