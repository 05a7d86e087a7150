"""Arrays of other projects' state dicts as numpy: copied, never shared with the source;
bfloat16 becomes float32 (exactly), other float dtypes are kept."""

from __future__ import annotations

import numpy as np

__all__ = ["to_numpy", "as_dict", "shape_error"]


def to_numpy(name: str, value) -> np.ndarray:
    """A torch tensor, JAX or numpy array as a numpy array of its own (floating only)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, without importing it
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()  # numpy has no bfloat16; widening is exact
        value = t.numpy()
    arr = np.array(value, copy=True)
    if arr.dtype.name == "bfloat16":  # ml_dtypes, e.g. from JAX
        arr = arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"state_dict[{name!r}] must hold floating values, got dtype {arr.dtype}")
    return arr


def as_dict(owner: str, state_dict) -> dict:
    """A mapping of names to tensors as a plain dict with str keys."""
    if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
        raise TypeError(f"{owner}: state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    return {str(k): state_dict[k] for k in state_dict.keys()}


def shape_error(owner: str, name: str, want: str, got) -> ValueError:
    return ValueError(f"{owner}: state_dict[{name!r}] must have shape {want}, got {tuple(got)}")
