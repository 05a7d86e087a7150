"""Packed sequences (DESIGN 5a) on torch: ``cu_seqlens`` checked as in the reference
(``memcore.spec.reference.packed``: int32 [N + 1], strictly increasing, batch 1, no state),
and the per-position tensors the packed paths mask with: the document of each position, its
position within the document, and where documents start."""

from __future__ import annotations

import numpy as np
import torch
from memcore.spec.reference.packed import check_cu_seqlens, per_token

__all__ = ["check_cu_seqlens", "segment_ids", "doc_positions", "doc_starts", "same_document",
           "cu_tensor", "longest"]


def segment_ids(bounds, device) -> torch.Tensor:
    """The document of each position: int64 [T]."""
    return torch.from_numpy(per_token(bounds)[0].astype(np.int64)).to(device)


def doc_positions(bounds, device) -> torch.Tensor:
    """Each position counted from its document's first token: int64 [T]."""
    return torch.from_numpy(per_token(bounds)[1]).to(device)


def doc_starts(bounds, device) -> torch.Tensor:
    """True at the first token of every document: bool [T]."""
    return doc_positions(bounds, device) == 0


def same_document(bounds, device) -> torch.Tensor:
    """[T, T] bool: positions t and j lie in the same document."""
    seg = segment_ids(bounds, device)
    return seg[:, None] == seg[None, :]


def cu_tensor(bounds):
    """Checked boundaries as the int32 ``cu_seqlens`` tensor a primitive takes (None stays
    None); kept on the host, where the boundaries are read."""
    return None if bounds is None else torch.tensor(bounds, dtype=torch.int32)


def longest(bounds) -> int:
    """The longest document's length."""
    return max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
