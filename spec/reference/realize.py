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
    """``y, state = layer(x, state)``; ``y_t, state = layer.step(x_t, state)``.

    ``aux_loss`` holds the innovation loss of the last call (bmojo; None otherwise).
    """

    backend = "reference"

    def __init__(self, spec: Spec, params: dict):
        check_params(spec, params)
        self.spec = spec
        self.params = dict(params)
        self.aux_loss = None

    def init_state(self, batch_size: int, like=None, dtype=None):
        """The empty state for inputs like ``like`` (its array library, device and dtype); without
        ``like``, numpy arrays of ``dtype`` (default: the parameters' dtype)."""
        return L.init_state(self.spec, batch_size, self._like(like, dtype))

    def _like(self, like, dtype):
        import numpy as np

        if like is not None:
            if dtype is not None:
                raise ValueError("init_state: give like or dtype, not both (like has a dtype)")
            return like
        if dtype is None:
            dtype = next(iter(self.params.values())).dtype
        if type(dtype).__module__ == "torch":  # torch dtypes name their numpy twin
            dtype = str(dtype).removeprefix("torch.")
        try:
            dtype = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"init_state: dtype must name a floating dtype, got {dtype!r}") from e
        return np.zeros((1,), dtype=dtype)

    def __call__(self, x, state=None):
        y, state, self.aux_loss = L.forward_aux(self.spec, self.params, x, state)
        return y, state

    def step(self, x_t, state=None):
        y, state, self.aux_loss = L.step_aux(self.spec, self.params, x_t, state)
        return y, state

    def __repr__(self):
        return f"ReferenceLayer({self.spec!r})"


class ReferenceModel(ReferenceLayer):
    """A model spec: token ids in, logits out; same call and step protocol as a layer."""

    def init_state(self, batch_size: int, like=None, dtype=None):
        """The empty state; ``like`` and ``dtype`` as for a layer (``like`` is an embedding
        output's stand-in: its dtype is the activations')."""
        return M.init_state(self.spec, batch_size, self._like(like, dtype))

    def __call__(self, tokens, state=None):
        y, state, self.aux_loss = M.forward_aux(self.spec, self.params, tokens, state)
        return y, state

    def step(self, tokens_t, state=None):
        y, state, self.aux_loss = M.step_aux(self.spec, self.params, tokens_t, state)
        return y, state

    def __repr__(self):
        return f"ReferenceModel({self.spec!r})"


def realize(spec: Spec, params: dict | None = None, seed: int = 0):
    """Entry point of the ``reference`` backend."""
    params = init(spec, seed) if params is None else params
    if isinstance(spec, Model):
        return ReferenceModel(spec, params)
    if isinstance(spec, LAYER_KINDS):
        return ReferenceLayer(spec, params)
    raise TypeError(f"spec must be a layer or model spec, got {spec!r}")
