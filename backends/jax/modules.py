"""The JAX backend's realized objects: strict ``equinox.Module``s over pure, jitted functions.

    layer = realize(spec, params)                  # params: memcore.init's dict (same names)
    y, state = layer(x, state=None)                # parallel form, x [B, T, D]
    y, state = layer(x, None, cu_seqlens=cu)       # a packed row (DESIGN 5a), batch 1
    y, state, aux = layer.forward_aux(x, state)    # also the innovation loss (bmojo), else None
    y_t, state = layer.step(x_t, state)            # streaming form, x_t [B, D]
    y_t, state, aux = layer.step_aux(x_t, state)
    state = layer.init_state(batch, dtype=None, device=None, max_len=None)

A model takes token ids and returns logits, and adds ``generate``. States are
``memcore.backends.jax.state.State`` pytrees of fixed shape. The kernel choice
(``implementation.resolve``) is taken per call from the concrete input, outside the jitted
core, and passed to it as a static argument. A growing cache (transformer window=None, mosaic
capacity=None) is sized by ``max_len``; in a state built by a call without one it is regrown
outside jit when a later call needs more room.

``cu_seqlens`` (int32 [N + 1]) is checked in full where it is concrete and by its dtype and
shape under jit, then passed to the jitted core as an array: one compilation serves every
packing of T tokens into N documents. A packed call takes the Pallas kernels where ``auto``
chooses them, except for the readout of the eidetic store, which runs plain JAX.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from memcore.spec import validate
from memcore.spec.base import Spec
from memcore.spec.model import has_aux
from memcore.spec.sizes import check_layout

from . import implementation as impl
from . import model
from . import state as S
from .layers import module
from .numerics import acc_dtype, is_traced
from .packed import check_cu_seqlens, last_start, max_chunk
from .state import State


def _cast(params: dict, dtype) -> dict:
    return {k: v.astype(dtype) for k, v in params.items()}


def _arrays(st: dict) -> dict:
    return {k: v for k, v in st.items() if k != "pos"}


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _layer_core(spec, params, x, arrays, pos, streaming, implementation, cu=None):
    p, m, st = _cast(params, x.dtype), module(spec), {**arrays, "pos": pos}
    if streaming:
        y, st, aux = m.step(spec, p, x, st)
    elif cu is not None:
        y, st, aux = m.forward(spec, p, x, st, implementation=implementation, cu_seqlens=cu)
    else:
        y, st, aux = m.forward(spec, p, x, st, implementation=implementation)
    return y, _arrays(st), aux


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _model_core(spec, params, tokens, arrays, pos, streaming, acc, implementation,
                positions=None, cu=None):
    p, st = _cast(params, acc), {**arrays, "pos": pos}
    if streaming:
        logits, st, aux = model.step(spec, p, tokens, st)
    else:
        logits, st, aux = model.forward(spec, p, tokens, st, implementation=implementation,
                                        positions=positions, cu_seqlens=cu)
    return logits, _arrays(st), aux


def _end(state, T: int, cu):
    """The position after a call of T tokens: T more, or a packed row's last document's
    length (from the empty state)."""
    return state.pos + (T if cu is None else (T - last_start(cu)).astype(state.pos.dtype))


def _check_room(spec, state, n: int, y):
    """A growing cache must hold the tokens: a clear error, also under jit (error_if)."""
    cap = S.capacity_left(spec, state)
    if cap is None:
        return y
    msg = (f"the state's cache holds max_len={cap} tokens; this call would need more: "
           f"build the state with init_state(batch, max_len=<longer>)")
    if not is_traced(state.pos):
        if int(state.pos) + n > cap:
            raise ValueError(msg + f" (pos={int(state.pos)}, tokens={n})")
        return y
    return eqx.error_if(y, state.pos + n > cap, msg)


def _jax_or_numpy(a, name: str) -> None:
    # numpy arrays are taken (and moved to JAX); another library's arrays are refused by name
    if validate.library(a) not in ("jax", "numpy"):
        raise TypeError(f"{name} must be a JAX or numpy array, got a {validate.library(a)} "
                        f"array ({type(a).__name__})")


def _check_x(spec, x, streaming: bool, name: str):
    validate.check_layer_input(spec, x, streaming=streaming, name=name, empty_ok=True)
    _jax_or_numpy(x, name)
    return jnp.asarray(x)


def _check_tokens(spec, tokens, streaming: bool):
    validate.check_tokens(spec, tokens, streaming=streaming, empty_ok=True)
    _jax_or_numpy(tokens, "tokens_t" if streaming else "tokens")
    tokens = jnp.asarray(tokens)
    if not is_traced(tokens):
        t = np.asarray(tokens)
        if t.size and (t.min() < 0 or t.max() >= spec.vocab_size):
            raise ValueError(f"{'tokens_t' if streaming else 'tokens'} must lie in [0, "
                             f"vocab_size={spec.vocab_size}), got values in [{t.min()}, "
                             f"{t.max()}]")
    return tokens


def _check_positions(positions, n: int):
    """Flat indices into the ``n`` positions of a call: integer [k], in range (checked where
    concrete, outside jit)."""
    _jax_or_numpy(positions, "positions")
    positions = jnp.asarray(positions)
    if positions.ndim != 1 or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be a 1-D integer array of flat indices into the "
                         f"B * T positions, got dtype {positions.dtype} shape "
                         f"{tuple(positions.shape)}")
    if not is_traced(positions) and positions.size:
        p = np.asarray(positions)
        if p.min() < 0 or p.max() >= n:
            raise ValueError(f"positions must lie in [0, B * T = {n}), got values in "
                             f"[{p.min()}, {p.max()}]")
    return positions


def _prepare_state(spec, state, batch: int, n: int, dtype, streaming: bool):
    if state is None:
        return S.init_state(spec, batch, max_len=n if n and S.needs_max_len(spec) else None,
                            dtype=dtype, growable=True)
    S.check_state(spec, state, batch, dtype)
    if state.growable and not is_traced(state.pos):
        state = S.regrow(spec, state, int(state.pos) + n)
    return state


def _check_layout(spec, state, batch: int, T: int, dtype, cu=None) -> None:
    """The parallel form's chunk layout within the allocation limit (its start position is
    known outside jit only; under jit, a start at a chunk boundary is assumed). A packed row
    of N documents lays out up to N - 1 partial chunks more: counted as that many chunks'
    tokens of the longest chunk."""
    pos = 0 if is_traced(state.pos) else int(state.pos)
    if cu is not None:
        T = T + (cu.shape[0] - 2) * max_chunk(spec)
    check_layout(spec, batch=batch, T=T, pos=pos, dtype_bytes=jnp.dtype(acc_dtype(dtype)).itemsize)


def _aux_zero(spec, dtype):
    """The aux loss of no tokens: 0 where the spec has one, else None."""
    return jnp.zeros((), acc_dtype(dtype)) if has_aux(spec) else None


def _init_state(spec, batch, dtype, device, max_len) -> State:
    state = S.init_state(spec, batch, max_len, dtype)
    return state if device is None else jax.device_put(state, device)


class JaxLayer(eqx.Module, strict=True):
    """A layer spec realized in JAX (see the module docstring for the protocol)."""

    params: dict
    spec: Spec = eqx.field(static=True)

    def init_state(self, batch: int, *, dtype=None, device=None,
                   max_len: int | None = None) -> State:
        """The empty state for inputs of ``dtype`` (default: JAX's default float)."""
        return _init_state(self.spec, batch, dtype, device, max_len)

    def forward_aux(self, x, state: State | None = None, *, cu_seqlens=None):
        """x [B, T, D] -> (y, state, aux). ``cu_seqlens`` (int32 [N + 1], batch 1, state None;
        the boundaries may be traced, N is static): documents packed in one row, each run as
        if alone from the empty state; the state is the last document's."""
        x = _check_x(self.spec, x, False, "x")
        B, T, _ = x.shape
        cu = check_cu_seqlens(cu_seqlens, T, B, state, "forward")
        state = _prepare_state(self.spec, state, B, T, x.dtype, False)
        if T == 0:  # empty in, empty out; the state as it was
            return jnp.zeros(x.shape, x.dtype), state, _aux_zero(self.spec, x.dtype)
        _check_layout(self.spec, state, B, T, x.dtype, cu)
        xa = x.astype(acc_dtype(x.dtype))
        y, arrays, aux = _layer_core(self.spec, self.params, xa, state.arrays, state.pos, False,
                                     impl.resolve(xa, packed=cu is not None), cu)
        y = _check_room(self.spec, state, T, y).astype(x.dtype)
        return y, State(_end(state, T, cu), arrays, self.spec.spec_id, state.growable), aux

    def __call__(self, x, state: State | None = None, *, cu_seqlens=None):
        y, state, _ = self.forward_aux(x, state, cu_seqlens=cu_seqlens)
        return y, state

    def step_aux(self, x_t, state: State | None = None):
        x_t = _check_x(self.spec, x_t, True, "x_t")
        state = _prepare_state(self.spec, state, x_t.shape[0], 1, x_t.dtype, True)
        xa = x_t.astype(acc_dtype(x_t.dtype))
        # The streaming forms have no kernel path: they compile once.
        y, arrays, aux = _layer_core(self.spec, self.params, xa, state.arrays, state.pos, True,
                                     "jax")
        y = _check_room(self.spec, state, 1, y).astype(x_t.dtype)
        return y, State(state.pos + 1, arrays, self.spec.spec_id, state.growable), aux

    def step(self, x_t, state: State | None = None):
        y, state, _ = self.step_aux(x_t, state)
        return y, state

    def to_reference_state(self, state: State) -> dict:
        return S.to_reference_state(self.spec, state)

    def from_reference_state(self, ref_state: dict, max_len: int | None = None) -> State:
        return S.from_reference_state(self.spec, ref_state, max_len)


class JaxModel(eqx.Module, strict=True):
    """A model spec realized in JAX: token ids [B, T] in, logits [B, T, V] out."""

    params: dict
    spec: Spec = eqx.field(static=True)

    @property
    def dtype(self):
        return acc_dtype(self.params["embed.weight"].dtype)

    def init_state(self, batch: int, *, dtype=None, device=None,
                   max_len: int | None = None) -> State:
        return _init_state(self.spec, batch, self.dtype if dtype is None else dtype, device,
                           max_len)

    def forward_aux(self, tokens, state: State | None = None, *, positions=None,
                    cu_seqlens=None):
        """tokens [B, T] -> (logits [B, T, V], state, aux); ``positions`` (integer [n], flat
        indices into the B * T positions, row-major): the logits there only, [n, V] (a
        fixed-length index array keeps traced shapes static under jit). ``cu_seqlens``
        (int32 [N + 1], batch 1, state None; boundaries may be traced): documents packed in
        one row, each run as if alone from the empty state; the state is the last
        document's, aux the layers' token means over the row."""
        tokens = _check_tokens(self.spec, tokens, False)
        B, T = tokens.shape
        cu = check_cu_seqlens(cu_seqlens, T, B, state, "forward")
        if positions is not None:
            positions = _check_positions(positions, B * T)
        state = _prepare_state(self.spec, state, B, T, self.dtype, False)
        if T == 0:  # empty in, empty out; the state as it was
            shape = (B, 0) if positions is None else (0,)
            logits = jnp.zeros(shape + (self.spec.vocab_size,), self.dtype)
            return logits, state, _aux_zero(self.spec, self.dtype)
        _check_layout(self.spec, state, B, T, self.dtype, cu)
        logits, arrays, aux = _model_core(
            self.spec, self.params, tokens, state.arrays, state.pos, False, self.dtype,
            impl.resolve(self.params["embed.weight"], packed=cu is not None), positions, cu)
        logits = _check_room(self.spec, state, T, logits)
        return logits, State(_end(state, T, cu), arrays, self.spec.spec_id, state.growable), aux

    def __call__(self, tokens, state: State | None = None, *, cu_seqlens=None):
        logits, state, _ = self.forward_aux(tokens, state, cu_seqlens=cu_seqlens)
        return logits, state

    def step_aux(self, tokens_t, state: State | None = None):
        tokens_t = _check_tokens(self.spec, tokens_t, True)
        state = _prepare_state(self.spec, state, tokens_t.shape[0], 1, self.dtype, True)
        logits, arrays, aux = _model_core(self.spec, self.params, tokens_t, state.arrays,
                                          state.pos, True, self.dtype, "jax")
        logits = _check_room(self.spec, state, 1, logits)
        return logits, State(state.pos + 1, arrays, self.spec.spec_id, state.growable), aux

    def step(self, tokens_t, state: State | None = None):
        logits, state, _ = self.step_aux(tokens_t, state)
        return logits, state

    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0, key=None,
                 state: State | None = None):
        """Continue ``prompt`` [B, T] by ``max_new_tokens``: greedy (argmax) with temperature 0,
        else sampled from softmax(logits / temperature) with the PRNG ``key``. Returns
        (new tokens [B, max_new_tokens], state). The continuation is one ``lax.scan``."""
        n = max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"generate: max_new_tokens must be a non-negative int, got {n!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not temperature >= 0:
            raise ValueError(f"generate: temperature must be a float >= 0, got {temperature!r}")
        if temperature > 0 and key is None:
            raise ValueError("generate: temperature > 0 samples, which needs key= (a "
                             "jax.random key)")
        prompt = _check_tokens(self.spec, prompt, False)
        B, T = prompt.shape
        if T == 0:
            raise ValueError("generate: prompt must hold at least one token, got T=0")
        if state is None:
            max_len = T + n if S.needs_max_len(self.spec) else None
            state = S.init_state(self.spec, B, max_len, self.dtype, growable=True)
        logits, state = self(prompt, state)
        if n == 0:
            return jnp.zeros((B, 0), jnp.int32), state
        if state.growable and not is_traced(state.pos):
            state = S.regrow(self.spec, state, int(state.pos) + n - 1)
        cap = S.capacity_left(self.spec, state)
        if cap is not None and not is_traced(state.pos) and int(state.pos) + n - 1 > cap:
            raise ValueError(f"generate: the state's cache holds max_len={cap} tokens, fewer "
                             f"than pos + max_new_tokens - 1 = {int(state.pos) + n - 1}")
        keys = None if temperature == 0 else jax.random.split(key, n)
        out, arrays, pos = _generate(self.spec, self.params, logits[:, -1], state.arrays,
                                     state.pos, keys, jnp.asarray(temperature, self.dtype),
                                     int(n), self.dtype)
        return out, State(pos, arrays, self.spec.spec_id, state.growable)

    def to_reference_state(self, state: State) -> dict:
        return S.to_reference_state(self.spec, state)

    def from_reference_state(self, ref_state: dict, max_len: int | None = None) -> State:
        return S.from_reference_state(self.spec, ref_state, max_len)


def _pick(logits, key, temperature):
    if key is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _generate(spec, params, last_logits, arrays, pos, keys, temperature, steps, acc):
    p = _cast(params, acc)
    first = _pick(last_logits, None if keys is None else keys[0], temperature)

    def body(carry, key):
        tok, arrays, pos = carry
        logits, st, _ = model.step(spec, p, tok, {**arrays, "pos": pos})
        nxt = _pick(logits, key, temperature)
        return (nxt, _arrays(st), pos + 1), tok

    rest = None if keys is None else keys[1:]
    (last, arrays, pos), toks = jax.lax.scan(body, (first, arrays, pos), rest,
                                             length=steps - 1)
    out = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last[:, None]], axis=1)
    return out, arrays, pos
