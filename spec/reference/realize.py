"""The reference backend's realized objects: plain Python objects over the functional reference.

They run on whatever Array API library the input comes from; parameters given as numpy arrays
are converted to the input's library, dtype and device at each call.
"""

from __future__ import annotations

from ..base import Spec
from ..layers import LAYER_KINDS
from ..model import Model
from ..params import check_params, init
from . import layers as L
from . import model as M


class ReferenceLayer:
    """``y, state = layer(x, state)``; ``y_t, state = layer.step(x_t, state)``;
    ``forward_aux`` and ``step_aux`` also return bmojo's innovation loss (None otherwise)."""

    backend = "reference"
    _impl = L  # the functional forms: reference.layers, or reference.model for a model

    def __init__(self, spec: Spec, params: dict):
        check_params(spec, params)
        self.spec = spec
        self.params = dict(params)

    def init_state(self, batch_size: int, *, dtype=None, device=None, max_len=None, like=None):
        """The empty state: numpy arrays for inputs of ``dtype`` (default: the parameters'
        dtype), or, with ``like``, arrays of ``like``'s library, device and dtype. ``max_len``
        is accepted for the backends' common signature; the reference's caches grow."""
        del max_len
        return self._impl.init_state(self.spec, batch_size, self._like(like, dtype, device))

    def _like(self, like, dtype, device):
        import numpy as np

        if like is not None:
            if dtype is not None:
                raise ValueError("init_state: give like or dtype, not both (like has a dtype)")
            if device is not None:
                raise ValueError("init_state: give like or device, not both (like has a device)")
            return like
        if device is not None and str(device) != "cpu":
            raise ValueError(f"init_state: device={device!r}: without like= the state is numpy "
                             f"arrays on the cpu; pass like= an array on that device")
        if dtype is None:
            dtype = next(iter(self.params.values())).dtype
        if type(dtype).__module__ == "torch":  # torch dtypes name their numpy twin
            dtype = str(dtype).removeprefix("torch.")
        try:
            dtype = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"init_state: dtype must name a floating dtype, got {dtype!r}") from e
        return np.zeros((1,), dtype=dtype)

    def forward_aux(self, x, state=None):
        """Parallel form: (y, state, aux)."""
        return self._impl.forward_aux(self.spec, self.params, x, state)

    def step_aux(self, x_t, state=None):
        """Streaming form: (y_t, state, aux)."""
        return self._impl.step_aux(self.spec, self.params, x_t, state)

    def __call__(self, x, state=None):
        y, state, _ = self.forward_aux(x, state)
        return y, state

    def step(self, x_t, state=None):
        y, state, _ = self.step_aux(x_t, state)
        return y, state

    def __repr__(self):
        return f"{type(self).__name__}({self.spec!r})"


class ReferenceModel(ReferenceLayer):
    """A model spec: token ids in, logits out; same call and step protocol as a layer (``like``
    for ``init_state`` stands in for an embedding output: its dtype is the activations')."""

    _impl = M


def realize(spec: Spec, params: dict | None = None, seed: int = 0):
    """Entry point of the ``reference`` backend."""
    params = init(spec, seed) if params is None else params
    if isinstance(spec, Model):
        return ReferenceModel(spec, params)
    if isinstance(spec, LAYER_KINDS):
        return ReferenceLayer(spec, params)
    raise TypeError(f"spec must be a layer or model spec, got {spec!r}")
