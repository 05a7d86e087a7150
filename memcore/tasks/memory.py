"""The memory a task model keeps per sequence, from its spec (no torch or JAX import)."""

from __future__ import annotations

from memcore.spec import sizes
from memcore.spec.model import Model

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


def memory_bytes(spec, seq_len: int) -> int:
    """Bytes a task model keeps per sequence at evaluation length ``seq_len``, from its spec:
    each mixer's streaming state (``memcore.spec.sizes.state_bytes``: recurrent state, windows,
    eidetic store and candidates, float32 with int64 store positions) with its growing cache
    filled to ``seq_len``, plus the short convolutions' last K - 1 inputs (``short_conv``).
    State + store + KV cache, as the B'MOJO paper counts memory."""
    if not isinstance(spec, Model):
        raise TypeError(f"memory_bytes: spec must be a memcore model spec, got "
                        f"{type(spec).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"memory_bytes: seq_len must be an int >= 0, got {seq_len!r}")
    states = sum(sizes.state_bytes(layer, 1, max_len=_filled(layer, seq_len),
                                   dtype_bytes=FLOAT_BYTES, index_bytes=8)
                 for layer in spec.layers)
    K = spec.short_conv
    return states + (spec.n_layers * (K - 1) * spec.d_model * FLOAT_BYTES if K else 0)
