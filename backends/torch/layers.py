"""``nn.Module`` realizations of the layer specs: ``y, state = layer(x, state)`` (parallel)
and ``y_t, state = layer.step(x_t, state)`` (streaming), states in the reference's format."""

from __future__ import annotations

import array_api_compat.torch as xp_torch
import torch
from memcore.spec.layers import Mosaic, Transformer, mixer_family
from memcore.spec.params import check_params
from memcore.spec.reference import layers as ref_layers
from memcore.spec.reference.layers import META
from memcore.spec.validate import check_layer_input
from torch import nn

from . import mixers
from ._util import acc_dtype, check_like_params, param_dict, register_params, step_params

_FORMS = {
    "windowed": (mixers.windowed_forward, mixers.windowed_step),
    "mamba": (lambda s, p, x, st, pos: (*mixers.mamba_forward(s, p, x, st), None),
              lambda s, p, x, st, pos, **kw: (*mixers.mamba_step(s, p, x, st, **kw), None)),
    "mosaic": (lambda s, p, x, st, pos: (*mixers.mosaic_forward(s, p, x, st, pos), None),
               lambda s, p, x, st, pos, **kw: (*mixers.mosaic_step(s, p, x, st, pos, **kw),
                                               None)),
    "persistent": (lambda s, p, x, st, pos: (*mixers.persistent_forward(s, p, x, st, pos), None),
                   lambda s, p, x, st, pos, **kw: (*mixers.persistent_step(s, p, x, st, pos,
                                                                           **kw), None)),
}


def own_storage(arrays: dict) -> dict:
    """The arrays, each on memory of its own and off any autograd graph: a step in place
    writes every array, but an empty state shares one zero tensor between several arrays (as
    the reference builds it), a parallel form may hand back views that share a buffer, and
    a state from a differentiable call may be saved for its backward. Only those are
    copied (once: the copies are what the state holds afterwards)."""
    out, seen = dict(arrays), set()
    for key, a in arrays.items():
        if not a.numel():
            continue
        ptr = a.untyped_storage().data_ptr()
        if ptr in seen or a.requires_grad:
            out[key] = a.detach().clone()
        else:
            seen.add(ptr)
    return out


def private_state(state):
    """A deep copy of a layer or model state whose arrays own contiguous memory of their own,
    for a caller that will step it in place."""
    if isinstance(state, dict):
        return {k: private_state(v) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(private_state(v) for v in state)
    if isinstance(state, torch.Tensor):
        return state.detach().clone(memory_format=torch.contiguous_format)
    return state


class TorchLayer(nn.Module):
    """A layer spec realized in torch. Parameter names are ``memcore.init``'s names.

    ``aux_loss`` holds the innovation loss of the last call (bmojo; None otherwise), a tensor
    on the autograd graph.
    """

    backend = "torch"

    def __init__(self, spec, params: dict):
        super().__init__()
        check_params(spec, params)
        self.spec = spec
        self.spec_id = spec.spec_id  # hashed once: states carry it at every step
        self._kind = mixer_family(spec)
        register_params(self, params)
        self.aux_loss = None
        self._shapes = {}

    # -- state ----------------------------------------------------------------------------------
    def _param_ref(self):
        return next(self.parameters())

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        """The state before any token, for inputs of ``dtype`` (default: the parameters'
        dtype) on ``device`` (default: the parameters' device). Arrays are kept in the
        accumulation dtype (float32, or float64 for float64 inputs)."""
        ref = self._param_ref()
        like = torch.zeros(1, dtype=dtype or ref.dtype, device=device or ref.device)
        # Separate buffers, so that the state can be stepped in place from the first token.
        state = ref_layers.init_state(self.spec, batch_size, like)
        state.update(own_storage({k: v for k, v in state.items() if k not in META}))
        return state

    def _expected(self, batch: int, acc: torch.dtype) -> dict:
        key = (batch, acc)
        if key not in self._shapes:
            meta = torch.zeros(1, dtype=acc, device="meta")
            arrays = ref_layers._arrays(xp_torch, self.spec, batch, acc, meta)
            self._shapes[key] = {n: (tuple(a.shape), a.dtype) for n, a in arrays.items()}
        return self._shapes[key]

    def check_state(self, state, batch: int, dtype, device, name: str = "state") -> None:
        """Raise a ValueError naming what in ``state`` does not fit this layer and input."""
        acc = acc_dtype(dtype)
        ok = (isinstance(state, dict) and state.get("spec_id") == self.spec_id
              and type(state.get("pos")) is int and state["pos"] >= 0)
        if ok:
            want = self._expected(batch, acc)
            ok = set(state) - set(META) == set(want)
            grows = self._growing()
            for n, (shape, dt) in want.items() if ok else ():
                got = state[n]
                if not isinstance(got, torch.Tensor) or got.dtype != dt:
                    ok = False
                    break
                gs = tuple(got.shape)
                if n in grows and len(gs) == 4:
                    gs = gs[:2] + (shape[2],) + gs[3:]
                if gs != shape:
                    ok = False
                    break
        if not ok:
            ref_layers.check_state(self.spec, state, batch, xp_torch, dtype, name)
            raise ValueError(f"{name} does not fit this {self.spec.kind} layer (expected "
                             f"torch tensors in {acc})")
        for n, a in state.items():
            if n not in META and a.device != device:
                raise ValueError(f"{name}[{n!r}] is on device {a.device}, but the input is on "
                                 f"{device}")

    def _growing(self):
        s = self.spec
        if isinstance(s, Transformer) and s.window is None:
            return ("k", "v")
        if isinstance(s, Mosaic) and s.capacity is None:
            return ("mem_k", "mem_v")
        return ()

    # -- both forms -----------------------------------------------------------------------------
    def _prepare(self, x, state, streaming: bool):
        name = "x_t" if streaming else "x"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_layer_input(self.spec, x, streaming=streaming, name=name)
        check_like_params(self, x, name)
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        else:
            self.check_state(state, x.shape[0], x.dtype, x.device)
        acc = acc_dtype(x.dtype)
        arrays = {k: v for k, v in state.items() if k not in META}
        return acc, x.to(acc), state["pos"], arrays

    def run(self, p: dict, x, arrays: dict, pos: int, streaming: bool, inplace: bool = False):
        """Unchecked form on the accumulation dtype: (y, new arrays, aux)."""
        if not streaming:
            return _FORMS[self._kind][0](self.spec, p, x, arrays, pos)
        if inplace:
            arrays = own_storage(arrays)
        return _FORMS[self._kind][1](self.spec, p, x, arrays, pos, inplace=inplace)

    def _call(self, x, state, streaming: bool, inplace: bool = False):
        if inplace:
            check_inplace()
        acc, xa, pos, arrays = self._prepare(x, state, streaming)
        p = step_params(self, acc) if streaming else param_dict(self, acc)
        y, arrays, aux = self.run(p, xa, arrays, pos, streaming, inplace)
        self.aux_loss = aux
        new = state if inplace and state is not None else {}
        new.update({"pos": pos + (1 if streaming else x.shape[1]), "spec_id": self.spec_id})
        new.update(arrays)
        return y.to(x.dtype), new

    def forward(self, x, state=None):
        """Parallel form: x [B, T, D] -> (y [B, T, D], final state)."""
        return self._call(x, state, streaming=False)

    def step(self, x_t, state=None, *, inplace: bool = False):
        """Streaming form: x_t [B, D] -> (y_t [B, D], state).

        By default the step is functional: it returns a new state, leaves ``state`` as it
        was, and is differentiable. ``inplace=True`` (under ``torch.no_grad()``, for
        generation) updates ``state`` itself and returns it: every array is written into
        the tensor that holds it (ring buffers, convolution window, recurrent states, store
        slots), so no state tensor is reallocated or changes shape, except the caches that
        grow by design (``transformer`` without a window, ``mosaic`` without a capacity):
        those become views of a buffer with spare room, copied only when it is full (a
        geometric growth). Anything else sharing the state's tensors sees the update too; a
        state from the parallel form may share tensors with the state given to it.
        """
        return self._call(x_t, state, streaming=True, inplace=inplace)

    def extra_repr(self) -> str:
        return repr(self.spec)


def check_inplace() -> None:
    if torch.is_grad_enabled():
        raise ValueError("step(..., inplace=True) overwrites the state's buffers, which "
                         "autograd may still need: call it under torch.no_grad()")
