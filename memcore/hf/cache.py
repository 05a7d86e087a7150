"""``MemcoreCache``: memcore's streaming state as a transformers ``Cache``.

A transformers cache usually holds keys and values per layer; a memcore model has one state
(``TorchModel.init_state``: a position counter and every layer's arrays, batch first). The
cache holds that state for the whole batch while every token it has seen was unmasked. Once an
``attention_mask`` masks a token, it holds one state per row instead (batch 1 each), so that each
row's state sees its unmasked tokens only, in order, at the positions they would have without
padding: rows then sit at different positions, which one state cannot express.

``get_seq_length()`` counts the columns seen (masked or not), as transformers' masks do.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from memcore.backends.torch.modules import private_state


def map_arrays(state, fn):
    """``state`` with ``fn`` applied to every tensor (dicts and tuples rebuilt; the position
    counters and spec ids kept)."""
    if isinstance(state, dict):
        return {k: map_arrays(v, fn) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(map_arrays(v, fn) for v in state)
    if isinstance(state, torch.Tensor):
        return fn(state)
    return state


def state_batch(state) -> int:
    """The batch size of a model state (its first layer array's first dimension)."""
    found = []
    map_arrays(state, lambda a: found.append(a.shape[0]))
    return found[0]


class MemcoreCache(Cache):
    """The state of a ``MemcoreForCausalLM`` between calls, for ``generate`` and for a caller
    that feeds a stream in pieces (``cache=`` of the model's forward).

    ``state``: one model state for the batch, or None; ``rows``: one state per row (None for a
    row that has seen no unmasked token yet), or None; ``seen``: columns consumed so far.
    """

    def __init__(self):
        # No per-layer cache objects: the memcore state is one object for the whole model.
        super().__init__(layers=[])
        self.state = None
        self.rows = None
        self.seen = 0

    def __repr__(self):
        if self.rows is not None:
            held = f"rows={len(self.rows)}"
        else:
            held = "empty" if self.state is None else f"batch={state_batch(self.state)}"
        return f"MemcoreCache(seen={self.seen}, {held})"

    # -- what transformers asks of a cache -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no fixed length: windows and stores are bounded, full-attention caches grow

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot be rolled back to an earlier token

    @property
    def is_linear(self) -> list[bool]:
        # Reported as not linear so that generate, handed a cache that has seen part of the
        # input, passes only the columns past get_seq_length() (as for attention caches).
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        return -1 if self.state is None else state_batch(self.state)

    def real_counts(self) -> list[int] | None:
        """Unmasked tokens seen by each row (None while nothing is held)."""
        if self.rows is not None:
            return [0 if s is None else s["pos"] for s in self.rows]
        if self.state is None:
            return None
        return [self.state["pos"]] * state_batch(self.state)

    def to_rows(self) -> None:
        """Hold one state per row from now on (each a copy that owns its memory)."""
        if self.rows is not None or self.state is None:
            return
        B = state_batch(self.state)
        self.rows = [private_state(map_arrays(self.state, lambda a, b=b: a[b:b + 1]))
                     for b in range(B)]
        self.state = None

    def reset(self) -> None:
        self.state, self.rows, self.seen = None, None, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("MemcoreCache.crop: a memcore state cannot forget tokens it has seen "
                             f"(asked to remove {tokens_to_remove}); start from a new cache")

    def activate_past_recording(self):
        raise ValueError("MemcoreCache cannot record past states to roll back to (assisted "
                         "generation needs that); memcore models generate on their own")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (in that order; a row may repeat)."""
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if self.rows is not None:
            # Each row is stepped in place later: a repeated row needs a copy of its own.
            self.rows = [None if self.rows[i] is None else private_state(self.rows[i])
                         for i in indices.tolist()]
        elif self.state is not None:
            self.state = map_arrays(
                self.state, lambda a: a.index_select(0, indices.to(a.device)).contiguous())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        B = self.batch_size
        if B > 0:
            self.batch_select_indices(torch.arange(B).repeat_interleave(repeats))
