"""The reference backend's realized objects: plain Python objects over the functional reference.

They run on whatever Array API library the input comes from; parameters given as numpy arrays
are converted to the input's library, dtype and device at each call.
"""

from __future__ import annotations

from ..base import Spec
from ..layers import LAYER_KINDS, Persistent
from ..model import Model, has_aux
from ..params import check_params, init
from ..sizes import check_allocation, growing
from ..validate import check_array, check_layer_input, check_state_arrays, check_tokens
from . import layers as L
from . import model as M
from .numerics import acc_dtype, device, namespace
from .packed import check_cu_seqlens


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
        is accepted for the backends' common signature (the reference's caches grow); it
        sizes the allocation check."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"init_state: batch must be a positive int, got {batch_size!r}")
        like = self._like(like, dtype, device)
        xp = namespace(like)
        check_allocation(self.spec, what="state", batch=batch_size, max_len=max_len,
                         dtype_bytes=_acc_bytes(xp, like.dtype))
        return self._impl.init_state(self.spec, batch_size, like)

    def _like(self, like, dtype, device):
        import numpy as np

        if like is not None:
            check_array("init_state", "like", like)
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
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"init_state: dtype must be a floating dtype, got {dtype}")
        return np.zeros((1,), dtype=dtype)

    def _empty(self, x, state):
        """T = 0: an empty output and the state as it was (checked; built if None). A layer
        with an innovation loss reports 0 for no tokens."""
        xp = namespace(x)
        B = x.shape[0]
        if state is None:
            state = L.init_state(self.spec, B, x)
        else:
            L.check_state(self.spec, state, B, xp, x.dtype)
        y = xp.zeros(tuple(x.shape), dtype=x.dtype, device=device(x))
        aux = (xp.zeros((), dtype=acc_dtype(xp, x.dtype), device=device(x))
               if has_aux(self.spec) else None)
        return y, state, aux

    def _check_growth(self, x, state, n: int):
        """A growing cache (KV cache, unbounded associative memory) must stay in bounds."""
        if not growing(self.spec):
            return
        pos = state.get("pos", 0) if isinstance(state, dict) else 0
        pos = pos if isinstance(pos, int) and not isinstance(pos, bool) else 0
        check_allocation(self.spec, what="state", batch=x.shape[0], max_len=pos + n,
                         dtype_bytes=_acc_bytes(namespace(x), x.dtype))

    def forward_aux(self, x, state=None, *, cu_seqlens=None):
        """Parallel form: (y, state, aux). An input of T = 0 tokens gives an empty output and
        leaves the state as it was. ``cu_seqlens`` (int32 [N + 1], batch 1, state None):
        documents packed in one row, each run as if alone from the empty state; the state
        returned is the last document's."""
        check_layer_input(self.spec, x, streaming=False, name="x", empty_ok=True)
        check_state_arrays(state)
        check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0], state)
        if x.shape[1] == 0:
            return self._empty(x, state)
        self._check_growth(x, state, x.shape[1])
        return self._impl.forward_aux(self.spec, self.params, x, state, cu_seqlens)

    def step_aux(self, x_t, state=None):
        """Streaming form: (y_t, state, aux)."""
        check_layer_input(self.spec, x_t, streaming=True, name="x_t")
        check_state_arrays(state)
        self._check_growth(x_t, state, 1)
        return self._impl.step_aux(self.spec, self.params, x_t, state)

    def __call__(self, x, state=None, *, cu_seqlens=None):
        y, state, _ = self.forward_aux(x, state, cu_seqlens=cu_seqlens)
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

    def forward_aux(self, tokens, state=None, *, cu_seqlens=None):
        """tokens [B, T] -> (logits [B, T, V], state, aux); T = 0 gives empty logits and leaves
        the state as it was. ``cu_seqlens``: as for a layer."""
        check_tokens(self.spec, tokens, streaming=False, empty_ok=True)
        check_state_arrays(state)
        check_cu_seqlens(cu_seqlens, tokens.shape[1], tokens.shape[0], state)
        if tokens.shape[1] == 0:
            return self._empty(tokens, state)
        self._check_growth(tokens, state, tokens.shape[1])
        return M.forward_aux(self.spec, self.params, tokens, state, cu_seqlens)

    def step_aux(self, tokens_t, state=None):
        check_tokens(self.spec, tokens_t, streaming=True)
        check_state_arrays(state)
        self._check_growth(tokens_t, state, 1)
        return M.step_aux(self.spec, self.params, tokens_t, state)

    def _float(self, tokens):
        """A 1-element array of the activations' dtype on the tokens' library and device."""
        xp = namespace(tokens)
        w = self.params["embed.weight"]
        dt = xp.float64 if str(w.dtype).endswith("float64") else xp.float32
        return xp.zeros((1,), dtype=dt, device=device(tokens))

    def _check_growth(self, tokens, state, n: int):
        if growing(self.spec):
            pos = state.get("pos", 0) if isinstance(state, dict) else 0
            pos = pos if isinstance(pos, int) and not isinstance(pos, bool) else 0
            like = self._float(tokens)
            check_allocation(self.spec, what="state", batch=tokens.shape[0], max_len=pos + n,
                             dtype_bytes=_acc_bytes(namespace(like), like.dtype))

    def _empty(self, tokens, state):
        spec, xp, like = self.spec, namespace(tokens), self._float(tokens)
        B = tokens.shape[0]
        if state is None:
            state = M.init_state(spec, B, like)
        else:
            if not isinstance(state, dict) or state.get("spec_id") != spec.spec_id:
                got = state.get("spec_id") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"state was made for another spec ({got!r}); this model has "
                                 f"spec_id {spec.spec_id!r}")
            keys = ("layers",) + (("ffn",) if isinstance(spec.ffn, Persistent) else ())
            for key in keys:
                held = state.get(key)
                if not isinstance(held, (tuple, list)) or len(held) != spec.n_layers:
                    raise ValueError(f"state[{key!r}] must hold {spec.n_layers} layer states, "
                                     f"got {held!r:.80}")
            for i, layer in enumerate(spec.layers):
                for key, s in ((k, layer if k == "layers" else spec.ffn) for k in keys):
                    L.check_state(s, state[key][i], B, xp, like.dtype, f"state[{key!r}][{i}]")
        logits = xp.zeros((B, 0, spec.vocab_size), dtype=like.dtype, device=device(tokens))
        aux = xp.zeros((), dtype=like.dtype, device=device(tokens)) if has_aux(spec) else None
        return logits, state, aux


def _acc_bytes(xp, dtype) -> int:
    """Bytes of one element of the accumulation dtype of ``dtype``."""
    return 8 if acc_dtype(xp, dtype) == xp.float64 else 4


def realize(spec: Spec, params: dict | None = None, seed: int = 0):
    """Entry point of the ``reference`` backend."""
    params = init(spec, seed) if params is None else params
    check_allocation(spec, what="state")
    if isinstance(spec, Model):
        return ReferenceModel(spec, params)
    if isinstance(spec, LAYER_KINDS):
        return ReferenceLayer(spec, params)
    raise TypeError(f"spec must be a layer or model spec, got {spec!r}")
