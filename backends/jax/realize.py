"""The JAX backend's realized objects: strict ``equinox.Module``s over pure, jitted functions.

    layer = realize(spec, params)               # params: memcore.init's numpy dict (same names)
    y, state = layer(x, state=None)             # parallel form, x [B, T, D]
    y, state, aux = layer.call_aux(x, state)    # also the innovation loss (bmojo), else None
    y_t, state = layer.step(x_t, state)         # streaming form, x_t [B, D]
    y_t, state, aux = layer.step_aux(x_t, state)
    state = layer.init_state(batch, max_len=None, dtype=None)

Modules are immutable, so the bmojo aux loss is returned by ``call_aux`` / ``step_aux``
rather than stored. A model realization takes token ids and returns logits, and adds
``generate``. States are ``memcore.backends.jax.state.State`` pytrees of fixed shape; growing
caches (transformer window=None, mosaic capacity=None) need ``max_len`` in ``init_state``
(a call without a state sizes them to the call). ``to_reference_state`` and
``from_reference_state`` convert to and from the reference's dicts.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from memcore.spec.base import Spec
from memcore.spec.layers import LAYER_KINDS
from memcore.spec.model import Model
from memcore.spec.params import check_params, init

from . import dispatch
from . import state as S
from ._base import POS_DTYPE, acc_dtype, is_traced
from .model import layer_forward, layer_step, run
from .state import State


def _cast(params: dict, dtype) -> dict:
    return {k: v.astype(dtype) for k, v in params.items()}


# ``kernels`` (dispatch.use_kernels, taken per call outside the jit) is static, so a compiled
# core never serves the other path. The streaming forms have no kernel path: they pass False
# and compile once.
@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _layer_core(spec, params, x, arrays, pos, streaming, kernels):
    p = _cast(params, x.dtype)
    fn = layer_step if streaming else layer_forward
    with dispatch.decided(kernels):
        return fn(spec, p, x, arrays, pos)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _model_core(spec, params, tokens, arrays, pos, streaming, acc, kernels):
    with dispatch.decided(kernels):
        return run(spec, _cast(params, acc), tokens, arrays, pos, streaming)


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


def _check_x(spec, x, streaming: bool, name: str):
    x = jnp.asarray(x)
    nd = 2 if streaming else 3
    want = "[batch, d_model]" if streaming else "[batch, T, d_model]"
    if x.ndim != nd:
        raise ValueError(f"{name} must be {want} with d_model={spec.d_model}, got shape "
                         f"{tuple(x.shape)}")
    if x.shape[-1] != spec.d_model:
        raise ValueError(f"{name} has width {x.shape[-1]}, expected d_model={spec.d_model} "
                         f"(shape {tuple(x.shape)})")
    if not streaming and x.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got T={x.shape[1]}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x


def _check_tokens(spec, tokens, streaming: bool):
    tokens = jnp.asarray(tokens)
    name = "tokens_t" if streaming else "tokens"
    want = "[batch]" if streaming else "[batch, T]"
    if tokens.ndim != (1 if streaming else 2):
        raise ValueError(f"{name} must be {want} integer token ids, got shape "
                         f"{tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if not streaming and tokens.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one token, got T=0")
    if not is_traced(tokens):
        t = np.asarray(tokens)
        if t.size and (t.min() < 0 or t.max() >= spec.vocab_size):
            raise ValueError(f"{name} must lie in [0, vocab_size={spec.vocab_size}), got values "
                             f"in [{t.min()}, {t.max()}]")
    return tokens


def _prepare_state(spec, state, batch: int, n: int, dtype, streaming: bool):
    if state is None:
        if streaming and S.needs_max_len(spec):
            raise ValueError(f"state is None: a {spec.kind} spec with a growing cache needs a "
                             f"state from init_state(batch, max_len=...) before step")
        return S.init_state(spec, batch, max_len=n if S.needs_max_len(spec) else None,
                            dtype=dtype)
    S.check_state(spec, state, batch, dtype)
    return state


class JaxLayer(eqx.Module, strict=True):
    """A layer spec realized in JAX (see the module docstring for the protocol)."""

    params: dict
    spec: Spec = eqx.field(static=True)

    def init_state(self, batch: int, max_len: int | None = None, dtype=None) -> State:
        """The empty state for inputs of ``dtype`` (default: JAX's default float)."""
        return S.init_state(self.spec, batch, max_len, dtype)

    def call_aux(self, x, state: State | None = None):
        x = _check_x(self.spec, x, False, "x")
        B, T, _ = x.shape
        state = _prepare_state(self.spec, state, B, T, x.dtype, False)
        xa = x.astype(acc_dtype(x.dtype))
        y, arrays, aux = _layer_core(self.spec, self.params, xa, state.arrays, state.pos, False,
                                     dispatch.use_kernels(xa))
        y = _check_room(self.spec, state, T, y).astype(x.dtype)
        return y, State(state.pos + T, arrays, self.spec.spec_id), aux

    def __call__(self, x, state: State | None = None):
        y, state, _ = self.call_aux(x, state)
        return y, state

    def step_aux(self, x_t, state: State | None = None):
        x_t = _check_x(self.spec, x_t, True, "x_t")
        state = _prepare_state(self.spec, state, x_t.shape[0], 1, x_t.dtype, True)
        xa = x_t.astype(acc_dtype(x_t.dtype))
        y, arrays, aux = _layer_core(self.spec, self.params, xa, state.arrays, state.pos, True,
                                     False)
        y = _check_room(self.spec, state, 1, y).astype(x_t.dtype)
        return y, State(state.pos + 1, arrays, self.spec.spec_id), aux

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

    def init_state(self, batch: int, max_len: int | None = None, dtype=None) -> State:
        return S.init_state(self.spec, batch, max_len, self.dtype if dtype is None else dtype)

    def call_aux(self, tokens, state: State | None = None):
        tokens = _check_tokens(self.spec, tokens, False)
        B, T = tokens.shape
        state = _prepare_state(self.spec, state, B, T, self.dtype, False)
        logits, arrays, aux = _model_core(self.spec, self.params, tokens, state.arrays,
                                          state.pos, False, self.dtype,
                                          dispatch.use_kernels(self.params["embed.weight"]))
        logits = _check_room(self.spec, state, T, logits)
        return logits, State(state.pos + T, arrays, self.spec.spec_id), aux

    def __call__(self, tokens, state: State | None = None):
        logits, state, _ = self.call_aux(tokens, state)
        return logits, state

    def step_aux(self, tokens_t, state: State | None = None):
        tokens_t = _check_tokens(self.spec, tokens_t, True)
        state = _prepare_state(self.spec, state, tokens_t.shape[0], 1, self.dtype, True)
        logits, arrays, aux = _model_core(self.spec, self.params, tokens_t, state.arrays,
                                          state.pos, True, self.dtype, False)
        logits = _check_room(self.spec, state, 1, logits)
        return logits, State(state.pos + 1, arrays, self.spec.spec_id), aux

    def step(self, tokens_t, state: State | None = None):
        logits, state, _ = self.step_aux(tokens_t, state)
        return logits, state

    def generate(self, prompt, steps: int, key=None, temperature: float = 1.0,
                 state: State | None = None):
        """Continue ``prompt`` [B, T] by ``steps`` tokens: greedy when ``key`` is None, else
        sampled from softmax(logits / temperature) with the PRNG ``key``. Returns
        (tokens [B, steps], state). The whole continuation is one ``lax.scan`` over ``step``."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"generate: steps must be a positive int, got {steps!r}")
        if key is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"generate: temperature must be a positive float, got "
                             f"{temperature!r}")
        prompt = _check_tokens(self.spec, prompt, False)
        B, T = prompt.shape
        if state is None:
            max_len = T + steps if S.needs_max_len(self.spec) else None
            state = self.init_state(B, max_len=max_len)
        logits, state = self(prompt, state)
        cap = S.capacity_left(self.spec, state)
        if cap is not None and not is_traced(state.pos) and int(state.pos) + steps - 1 > cap:
            raise ValueError(f"generate: the state's cache holds max_len={cap} tokens, fewer "
                             f"than pos + steps - 1 = {int(state.pos) + steps - 1}")
        keys = None if key is None else jax.random.split(key, steps)
        out, arrays, pos = _generate(self.spec, self.params, logits[:, -1], state.arrays,
                                     state.pos, keys, jnp.asarray(temperature, self.dtype),
                                     int(steps), self.dtype)
        return out, State(pos, arrays, self.spec.spec_id)

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
        logits, arrays, _ = run(spec, p, tok, arrays, pos, True)
        nxt = _pick(logits, key, temperature)
        return (nxt, arrays, pos + 1), tok

    rest = None if keys is None else keys[1:]
    (last, arrays, pos), toks = jax.lax.scan(body, (first, arrays, pos), rest,
                                             length=steps - 1)
    out = jnp.concatenate([jnp.moveaxis(toks, 0, 1), last[:, None]], axis=1)
    return out, arrays, pos


def realize(spec: Spec, params: dict | None = None, seed: int = 0, dtype=None, **options):
    """Entry point of the ``jax`` backend: a ``JaxLayer`` or ``JaxModel``.

    params: ``memcore.init``'s dict (default ``init(spec, seed)``), kept in its dtype unless
    ``dtype`` is given.
    """
    if options:
        raise TypeError(f"realize (jax): unknown options {sorted(options)}; accepted: dtype")
    if not isinstance(spec, (Model,) + LAYER_KINDS):
        raise TypeError(f"spec must be a memcore layer or model spec, got {spec!r}")
    params = init(spec, seed) if params is None else params
    check_params(spec, params)
    arrays = {}
    for name, value in params.items():
        a = jnp.asarray(np.asarray(value) if not isinstance(value, jax.Array) else value)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"params[{name!r}] must be floating, got dtype {a.dtype}")
        arrays[name] = a if dtype is None else a.astype(dtype)
    cls = JaxModel if isinstance(spec, Model) else JaxLayer
    return cls(arrays, spec)


__all__ = ["realize", "JaxLayer", "JaxModel", "State", "POS_DTYPE"]
