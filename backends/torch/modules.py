"""``nn.Module`` realizations: ``TorchLayer`` (a layer spec) and ``TorchModel`` (a model spec).

    y, state = obj(x, state)              y, state, aux = obj.forward_aux(x, state)
    y_t, state = obj.step(x_t, state)     y_t, state, aux = obj.step_aux(x_t, state)

States use the reference's format, so they pass between backends; aux is bmojo's innovation
loss (a tensor on the autograd graph, summed over a model's layers) or None.
"""

from __future__ import annotations

import array_api_compat.torch as xp_torch
import torch
from memcore.spec.layers import Mosaic, Transformer
from memcore.spec.model import Model, has_aux
from memcore.spec.params import check_params
from memcore.spec.reference import layers as ref_layers
from memcore.spec.sizes import check_allocation, check_layout, growing
from memcore.spec.validate import check_layer_input, check_tokens
from torch import nn

from . import layers, model, short_conv
from .numerics import acc_dtype
from .packed import check_cu_seqlens
from .params import check_like_params, param_dict, register_params, step_params, sub

META = model.META


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


def check_inplace() -> None:
    if torch.is_grad_enabled():
        raise ValueError("step(..., inplace=True) overwrites the state's buffers, which "
                         "autograd may still need: call it under torch.no_grad()")


def _check_batch(batch) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"init_state: batch must be a positive int, got {batch!r}")


def _state_dtype(dtype, ref: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype`` (default ``ref``), which must be a floating one."""
    if dtype is None:
        dtype = ref
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"init_state: dtype must be a floating torch.dtype, got {dtype!r}")
    return acc_dtype(dtype)


def _check_size(spec, batch: int, max_len, acc: torch.dtype) -> None:
    check_allocation(spec, what="state", batch=batch, max_len=max_len,
                     dtype_bytes=acc.itemsize)


def _check_growth(spec, state, batch: int, n: int, acc: torch.dtype, streaming: bool) -> None:
    """A growing cache (KV cache, unbounded associative memory) and the parallel form's chunk
    layout must stay within the limit."""
    if growing(spec):
        _check_size(spec, batch, state["pos"] + n, acc)
    if not streaming:
        check_layout(spec, batch=batch, T=n, pos=state["pos"], dtype_bytes=acc.itemsize)


def _check_tensors(state, name: str) -> None:
    """Every array of a layer state is a torch.Tensor (before the shape and dtype checks)."""
    if isinstance(state, dict):
        for n, a in state.items():
            if n not in META and not isinstance(a, torch.Tensor):
                raise TypeError(f"{name}[{n!r}] must be a torch.Tensor, got "
                                f"{type(a).__module__}.{type(a).__name__}")


class TorchLayer(nn.Module):
    """A layer spec realized in torch. Parameter names are ``memcore.init``'s names."""

    backend = "torch"

    def __init__(self, spec, params: dict):
        super().__init__()
        check_params(spec, params)
        self.spec = spec
        self.spec_id = spec.spec_id  # hashed once: states carry it at every step
        layers.module(spec)  # a layer spec, or a TypeError naming it
        register_params(self, params)
        self._shapes = {}

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, batch: int, *, dtype=None, device=None, max_len=None) -> dict:
        """The state before any token, for inputs of ``dtype`` (default: the parameters'
        dtype) on ``device`` (default: the parameters' device). Arrays are kept in the
        accumulation dtype (float32, or float64 for float64 inputs), each in a buffer of its
        own, so that the state can be stepped in place from the first token. ``max_len`` is
        accepted for the backends' common signature: torch's caches grow."""
        _check_batch(batch)
        ref = next(self.parameters())
        acc = _state_dtype(dtype, ref.dtype)
        _check_size(self.spec, batch, max_len, acc)
        return layers.init_state(self.spec, batch, dtype=acc, device=device or ref.device)

    def _expected(self, batch: int, acc: torch.dtype) -> dict:
        key = (batch, acc)
        if key not in self._shapes:
            arrays = layers.init_state(self.spec, batch, dtype=acc, device="meta")
            self._shapes[key] = {n: (tuple(a.shape), a.dtype) for n, a in arrays.items()
                                 if n not in META}
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
            _check_tensors(state, name)
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
    def _call(self, x, state, streaming: bool, inplace: bool = False, cu_seqlens=None):
        if inplace:
            check_inplace()
        name = "x_t" if streaming else "x"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_layer_input(self.spec, x, streaming=streaming, name=name, empty_ok=True)
        check_like_params(self, x, name)
        bounds = None if streaming else check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0],
                                                         state)
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        else:
            self.check_state(state, x.shape[0], x.dtype, x.device)
        acc = acc_dtype(x.dtype)
        if not streaming and x.shape[1] == 0:  # empty in, empty out; the state as it was
            aux = x.new_zeros((), dtype=acc) if has_aux(self.spec) else None
            return x.new_zeros(x.shape), state, aux
        _check_growth(self.spec, state, x.shape[0], 1 if streaming else x.shape[1], acc,
                      streaming)
        p = step_params(self, acc) if streaming else param_dict(self, acc)
        y, new, aux = model.run_layer(self.spec, p, x.to(acc), state, streaming, inplace,
                                      bounds)
        return y.to(x.dtype), new, aux

    def forward(self, x, state=None, *, cu_seqlens=None):
        """Parallel form: x [B, T, D] -> (y [B, T, D], final state). T = 0 gives an empty y
        and the state as it was. ``cu_seqlens`` (int32 [N + 1], batch 1, state None):
        documents packed in one row, each run as if alone from the empty state; the state
        returned is the last document's."""
        return self._call(x, state, streaming=False, cu_seqlens=cu_seqlens)[:2]

    def forward_aux(self, x, state=None, *, cu_seqlens=None):
        """``forward`` and the layer's aux (bmojo's innovation loss; None otherwise)."""
        return self._call(x, state, streaming=False, cu_seqlens=cu_seqlens)

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
        return self._call(x_t, state, streaming=True, inplace=inplace)[:2]

    def step_aux(self, x_t, state=None, *, inplace: bool = False):
        """``step`` and the layer's aux."""
        return self._call(x_t, state, streaming=True, inplace=inplace)

    def extra_repr(self) -> str:
        return repr(self.spec)


class TorchModel(nn.Module):
    """Token ids in, logits out; ``forward``, ``step``, ``init_state`` and ``generate``."""

    backend = "torch"

    def __init__(self, spec: Model, params: dict):
        super().__init__()
        check_params(spec, params)
        self.spec = spec
        self.spec_id = spec.spec_id
        self._persistent = model.persistent_ffn(spec)
        blocks = nn.Module()
        for i, layer in enumerate(spec.layers):
            block = nn.Module()
            block.add_module("mixer", TorchLayer(layer, sub(params, f"layers.{i}.mixer.")))
            if self._persistent:
                block.add_module("ffn", TorchLayer(spec.ffn, sub(params, f"layers.{i}.ffn.")))
            blocks.add_module(str(i), block)
        self.add_module("layers", blocks)
        owned = ("mixer.",) + (("ffn.",) if self._persistent else ())
        rest = {n: a for n, a in params.items()
                if not (n.startswith("layers.") and n.split(".", 2)[2].startswith(owned))}
        register_params(self, rest)

    def _blocks(self):
        return [self.layers._modules[str(i)] for i in range(self.spec.n_layers)]

    def init_state(self, batch: int, *, dtype=None, device=None, max_len=None) -> dict:
        """The state before any token; ``dtype`` is the compute dtype (default: the
        parameters'), the state's arrays use its accumulation dtype. ``max_len``: accepted
        for the backends' common signature (torch's caches grow)."""
        _check_batch(batch)
        ref = self.embed.weight
        acc = _state_dtype(dtype, ref.dtype)
        _check_size(self.spec, batch, max_len, acc)
        return model.init_state(self.spec, batch, dtype=acc, device=device or ref.device)

    def _check_state(self, state, B, dtype, device):
        spec = self.spec
        if not isinstance(state, dict) or state.get("spec_id") != self.spec_id:
            got = state.get("spec_id") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state was made for another spec ({got!r}); this model has "
                             f"spec_id {spec.spec_id!r}")
        for key in ("layers",) + (("ffn",) if self._persistent else ()):
            if not isinstance(state.get(key), (tuple, list)) or len(state[key]) != spec.n_layers:
                raise ValueError(f"state[{key!r}] must hold {spec.n_layers} layer states, got "
                                 f"{state.get(key)!r:.80}")
        for i, b in enumerate(self._blocks()):
            b.mixer.check_state(state["layers"][i], B, dtype, device, f"state['layers'][{i}]")
            if self._persistent:
                b.ffn.check_state(state["ffn"][i], B, dtype, device, f"state['ffn'][{i}]")
        if spec.short_conv:
            short_conv.check_state(spec, state.get("conv"), B, acc_dtype(dtype), device)

    def _run(self, tokens, state, streaming: bool, inplace: bool = False,
             logits_to_keep: int = 0, cu_seqlens=None, positions=None):
        if inplace:
            check_inplace()
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or \
                logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got "
                             f"{logits_to_keep!r}")
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got "
                            f"{type(tokens).__name__}")
        check_tokens(self.spec, tokens, streaming=streaming, empty_ok=True)
        bounds = None if streaming else check_cu_seqlens(cu_seqlens, tokens.shape[1],
                                                         tokens.shape[0], state)
        if positions is not None:
            model.check_positions(positions, tokens, logits_to_keep)
        w = self.embed.weight
        if tokens.device != w.device:
            raise ValueError(f"tokens are on device {tokens.device}, but the parameters are on "
                             f"{w.device}")
        V = self.spec.vocab_size
        if tokens.numel() and bool(((tokens < 0) | (tokens >= V)).any()):
            raise ValueError(f"tokens must lie in [0, vocab_size={V}), got values from "
                             f"{int(tokens.min())} to {int(tokens.max())}")
        acc = acc_dtype(w.dtype)
        if state is None:
            state = self.init_state(tokens.shape[0], device=tokens.device, dtype=acc)
        else:
            self._check_state(state, tokens.shape[0], acc, tokens.device)
        if not streaming and tokens.shape[1] == 0:  # empty in, empty out; the state as it was
            aux = w.new_zeros((), dtype=acc) if has_aux(self.spec) else None
            shape = (tokens.shape[0], 0) if positions is None else (0,)
            return w.new_zeros(shape + (self.spec.vocab_size,), dtype=acc), state, aux
        _check_growth(self.spec, state, tokens.shape[0], 1 if streaming else tokens.shape[1], acc,
                      streaming)
        p = step_params(self, acc) if streaming else param_dict(self, acc)
        return model.run(self.spec, p, tokens, state, streaming, inplace, logits_to_keep,
                         bounds, positions)

    def forward(self, tokens, state=None, *, logits_to_keep: int = 0, cu_seqlens=None,
                positions=None):
        """tokens [B, T] ints -> (logits [B, T, V], final state). ``logits_to_keep=n > 0``
        returns the logits of the last n positions only ([B, min(n, T), V]), sparing the head's
        matmul elsewhere; the state is the same. ``positions`` (an int tensor [n] of flat
        indices into the B * T positions, row-major): the logits there only ([n, V]), e.g. a
        task's labelled positions. ``cu_seqlens`` (int32 [N + 1], batch 1, state None):
        documents packed in one row, each run as if alone from the empty state; the state
        returned is the last document's."""
        return self._run(tokens, state, streaming=False, logits_to_keep=logits_to_keep,
                         cu_seqlens=cu_seqlens, positions=positions)[:2]

    def forward_aux(self, tokens, state=None, *, logits_to_keep: int = 0, cu_seqlens=None,
                    positions=None):
        """``forward`` and the aux summed over the layers (None where no layer has one)."""
        return self._run(tokens, state, streaming=False, logits_to_keep=logits_to_keep,
                         cu_seqlens=cu_seqlens, positions=positions)

    def step(self, tokens_t, state=None, *, inplace: bool = False):
        """tokens_t [B] ints -> (logits [B, V], state). Functional by default (a new state,
        ``state`` untouched, differentiable); ``inplace=True`` (under ``torch.no_grad()``)
        updates ``state`` itself and returns it, as ``TorchLayer.step`` does: no state
        tensor is reallocated."""
        return self._run(tokens_t, state, streaming=True, inplace=inplace)[:2]

    def step_aux(self, tokens_t, state=None, *, inplace: bool = False):
        """``step`` and the aux summed over the layers."""
        return self._run(tokens_t, state, streaming=True, inplace=inplace)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None, state=None):
        """Continue ``prompt`` [B, T] by ``max_new_tokens``: greedy (argmax) with temperature
        0, else sampling from softmax(logits / temperature) with ``generator``. The prompt runs
        in the parallel form, each new token but the last through ``step`` in place, on a
        private copy of the state: ``state`` is left as it was.

        Returns (new tokens [B, max_new_tokens], state): the state has seen the prompt and
        every new token but the last, so stepping that token continues the stream."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got "
                             f"{max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not temperature >= 0:
            raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        if isinstance(prompt, torch.Tensor) and prompt.ndim == 2 and prompt.shape[1] == 0:
            raise ValueError("generate: prompt must hold at least one token, got T=0")
        logits, state = self(prompt, state, logits_to_keep=1)
        # The parallel form may return arrays of the caller's state (e.g. a store that no
        # chunk end changed) or views of one buffer: step a copy that owns its memory.
        state = private_state(state)
        last = logits[:, -1]
        out = []
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = last.argmax(-1)
            else:
                probs = torch.softmax(last.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            nxt = nxt.to(prompt.dtype)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                last, state = self.step(nxt, state, inplace=True)
        if not out:
            return prompt[:, :0].clone(), state
        return torch.cat(out, dim=1), state

    def extra_repr(self) -> str:
        return repr(self.spec)
