"""Packed training rows for ``memcore lm --packed``: whole documents of the training split in one
row of batch 1, with ``cu_seqlens`` (DESIGN 5a), so that every document starts from the empty
state and no loss term reads across a document boundary.

- Documents: the split's bytes cut at every blank line ("\\n\\n", the separator dropped); a
  piece shorter than 2 bytes has no next-byte target and is left out.
- A row of ``row_len`` bytes takes documents in a random order (a pure function of (seed,
  step)), each whole if it fits in what is left of the row, a document longer than the whole
  row cut to it; after ``MISSES`` documents in a row that do not fit, the rest of the row is
  one padding segment (byte 0, never labelled).
- Labels: the next byte inside the same document, IGNORE at each document's last position and
  on the padding.
"""

from __future__ import annotations

import numpy as np
import torch

from memcore.tasks.mqar import IGNORE

MISSES = 8  # documents that do not fit before the rest of a row is padding
PAD = 0


def documents(data: np.ndarray) -> list[np.ndarray]:
    """The documents of ``data`` (bytes as ints [n]): cut at blank lines, each of >= 2 bytes."""
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    docs = [np.frombuffer(d, dtype=np.uint8).astype(np.int64) for d in raw.split(b"\n\n")]
    return [d for d in docs if len(d) >= 2]


def pack_row(docs: list, row_len: int, rng: np.random.Generator):
    """(tokens [1, row_len] int64, labels [1, row_len] int64, cu_seqlens int32 [N + 1], the
    documents' indices in ``docs`` in row order) for one packed row."""
    if not docs:
        raise ValueError("--packed: the training split holds no document of at least 2 bytes "
                         "(documents are separated by blank lines)")
    tokens = np.full(row_len, PAD, dtype=np.int64)
    labels = np.full(row_len, IGNORE, dtype=np.int64)
    cu, used, filled, misses = [0], [], 0, 0
    while filled < row_len and misses < MISSES:
        i = int(rng.integers(len(docs)))
        d = docs[i]
        if len(d) > row_len - filled and not (filled == 0 and len(d) > row_len):
            misses += 1
            continue
        d = d[:row_len - filled]  # only a document longer than the whole row is cut
        n = len(d)
        tokens[filled:filled + n] = d
        labels[filled:filled + n - 1] = d[1:]
        filled += n
        cu.append(filled)
        used.append(i)
        misses = 0
    if filled < row_len:
        cu.append(row_len)  # the padding: a segment of its own
    return tokens[None], labels[None], np.asarray(cu, dtype=np.int32), used


def packed_batches(docs: list, row_len: int, seed: int):
    """batch_fn(step) -> (tokens [1, row_len], labels [1, row_len], cu_seqlens): a pure function
    of (seed, step), so that a resumed run replays the data."""
    def batch(step):
        return pack_row(docs, row_len, np.random.default_rng([seed, 4, step]))[:3]
    return batch


def packed_loss(aux_weight: float):
    """The torch loop's ``loss_fn`` for packed batches: the cross-entropy at the labelled
    positions (the head only there), each document run alone (``cu_seqlens``), plus the
    weighted aux loss. Returns (total, cross_entropy)."""
    def loss_fn(net, tokens, labels, cu_seqlens):
        mask = labels != IGNORE
        logits = net(tokens, mask, cu_seqlens.to(device="cpu", dtype=torch.int32))
        ce = torch.nn.functional.cross_entropy(logits.float(), labels[mask])
        aux = getattr(getattr(net, "module", net), "aux_loss", None)
        total = ce if aux is None or not aux_weight else ce + aux_weight * aux
        return total, ce
    return loss_fn
