"""The tasks' language models: a model spec realized by ``memcore.realize`` on
``memcore.init(spec, seed)``'s parameters (the short convolution before each mixer, where a task
uses one, is the spec's ``short_conv``).

- torch: ``TaskModel``, the realized ``nn.Module`` behind the torch loop's interface,
  ``model(tokens, mask=None, cu_seqlens=None)`` (logits at the masked positions only: at an
  8192-way vocabulary the head dominates the cost, and MQAR's loss reads only the labelled
  positions) with the last call's aux loss in ``aux_loss``. A module, so that the loop's
  data-parallel wrapper calls it.
- JAX: the realized ``equinox.Module`` itself, with the functions of ``jax_stack``.

``state_bytes(model, tokens)`` counts what either keeps to continue after ``tokens``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import memcore
from memcore.spec.model import Model


class TaskModel(nn.Module):
    """A realized torch model (``memcore.realize(..., backend="torch")``) for the loop:
    token ids [B, T] -> logits [B, T, V], or [n, V] at the True positions of ``mask`` [B, T]
    (row-major)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "backend", None) != "torch" or not isinstance(model.spec, Model):
            raise TypeError(f"TaskModel wraps a realized torch model (a model spec), got "
                            f"{type(model).__name__}")
        self.model = model
        self.aux_loss = None  # the last forward's aux (the loop reads it)

    @property
    def spec(self) -> Model:
        return self.model.spec

    def forward(self, tokens, mask=None, cu_seqlens=None):
        positions = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                    mask.shape != tokens.shape:
                raise ValueError(f"mask must be a bool tensor of the tokens' shape "
                                 f"{tuple(tokens.shape)}, got {getattr(mask, 'dtype', None)} "
                                 f"{tuple(getattr(mask, 'shape', ()))}")
            positions = mask.reshape(-1).nonzero()[:, 0]
        logits, _, self.aux_loss = self.model.forward_aux(tokens, positions=positions,
                                                          cu_seqlens=cu_seqlens)
        return logits


def task_model(backend: str, spec: Model, seed: int):
    """``spec`` realized on ``backend`` with ``memcore.init(spec, seed)``'s parameters: a
    ``TaskModel`` (torch) or the JAX model (jax)."""
    if not isinstance(spec, Model):
        raise TypeError(f"spec must be a memcore model spec, got {type(spec).__name__}")
    model = memcore.realize(spec, backend=backend, params=memcore.init(spec, seed))
    return model if backend == "jax" else TaskModel(model)


def _arrays(state):
    if isinstance(state, dict):
        for v in state.values():
            yield from _arrays(v)
    elif isinstance(state, (tuple, list)):
        for v in state:
            yield from _arrays(v)
    elif hasattr(state, "shape") and hasattr(state, "dtype"):
        yield state


def _nbytes(a) -> int:
    # Floats count at float32 (the models' dtype), integer positions at their own width.
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return int(a.size) * (4 if np.issubdtype(a.dtype, np.floating) else a.itemsize)


def state_bytes(model, tokens) -> int:
    """Bytes of everything ``model`` (a ``TaskModel`` or a JAX model) keeps to continue after
    ``tokens`` [1, T]: its streaming state after them (each mixer's recurrent state, windows,
    store or KV cache, and the short convolutions' last K - 1 inputs), floats at float32."""
    if getattr(tokens, "ndim", None) != 2 or tokens.shape[0] != 1:
        raise ValueError(f"state_bytes: tokens must be [1, T], got "
                         f"{tuple(getattr(tokens, 'shape', ()))}")
    if isinstance(model, TaskModel):
        with torch.no_grad():
            x = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
            _, state = model.model(x)
    else:
        import jax.numpy as jnp

        _, st = model(jnp.asarray(np.asarray(tokens)))
        state = model.to_reference_state(st)  # caches cut to the tokens held
    return sum(_nbytes(a) for a in _arrays(state))
