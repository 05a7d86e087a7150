"""Bad-input cases for realized layers and models, shared by the reference, torch and JAX
files: each backend gives an adapter (its arrays, its states) and gets the same cases.

Cases are built as ``(id, fn, exc, pattern)``; ``fn`` builds its layer and arrays when it runs,
so that every allocation happens under the case's memory cap."""

from __future__ import annotations

import functools

import numpy as np

import memcore
from memcore import spec as S

D = 6
LAYERS = {
    "bmojo": S.bmojo(D, 2, window=2, chunk=3, select=1, capacity=2, d_state=2),
    "mamba": S.mamba(D, d_state=3, d_conv=3),
    "mosaic": S.mosaic(D, 2),
    "transformer": S.transformer(D, 2),
    "persistent": S.persistent(D, 2, slots=3),
}
MODEL = S.model([S.mamba(D, d_state=2), S.transformer(D, 2, window=3)], vocab_size=7,
                ffn="persistent")
OTHER = S.bmojo_f(D, 2, window=3, d_state=2)  # a state of this spec fits no layer above


@functools.cache
def params64(spec):
    return memcore.init(spec, 0, np.float64)


class Adapter:
    """How a backend's arrays and states look. Subclasses set ``backend`` and the few messages
    that differ between backends."""

    backend = ""
    not_array = r"must be an array .*got"  # a list or None where an array belongs
    not_state = r"state must be a memcore state dict"
    not_state_exc = ValueError
    int_dtype = np.int32

    def arr(self, a):
        return a

    def realize(self, spec, params=None):
        return memcore.realize(spec, backend=self.backend,
                               params=params64(spec) if params is None else params)

    @functools.cache  # noqa: B019 - the adapters live as long as the test modules
    def layer(self, spec):
        return self.realize(spec)

    def state(self, spec, batch=1):
        return self.layer(spec).init_state(batch)

    # States are dicts in the reference and torch; JAX overrides these three.
    def arrays(self, state):
        return {k: v for k, v in state.items() if k not in ("pos", "spec_id")}

    def replace(self, state, **arrays):
        return {**state, **arrays}

    def without(self, state, key):
        return {k: v for k, v in state.items() if k != key}

    def with_pos(self, state, pos):
        return {**state, "pos": pos}

    def cast(self, a, dtype):
        return np.asarray(a).astype(dtype)


def _float_key(ad, state):
    return next(k for k, v in ad.arrays(state).items()
                if np.issubdtype(np.asarray(v).dtype, np.floating))


def layer_cases(ad: Adapter):
    return [(f"{name}-{cid}", fn, exc, pattern) for name, spec in LAYERS.items()
            for cid, fn, exc, pattern in _one_layer(ad, spec)]


def _one_layer(ad: Adapter, spec):
    def x(shape=(2, 5, D), dtype=np.float64):
        return ad.arr(np.ones(shape, dtype))

    def call(fn):
        return lambda: fn(ad.layer(spec))

    def with_state(mutate, batch=2):
        return lambda: ad.layer(spec)(x(), mutate(ad.state(spec, batch)))

    def set_float(value):
        """A mutation: the state's first float array replaced by ``value(that array)``."""
        def mutate(s):
            key = _float_key(ad, s)
            return ad.replace(s, **{key: value(ad.arrays(s)[key])})
        return mutate

    def with_params(mutate):
        def fn():
            p = dict(params64(spec))
            mutate(p)
            return ad.realize(spec, p)
        return fn

    first = next(iter(memcore.param_shapes(spec)))

    def set_first(value):
        return with_params(lambda p: p.update({first: value(p[first])}))

    return [
        ("x-int", call(lambda m: m(x(dtype=np.int64))), TypeError,
         r"x must be a floating-point array, got dtype .*int64"),
        ("x-bool", call(lambda m: m(x(dtype=np.bool_))), TypeError,
         r"x must be a floating-point array, got dtype .*bool"),
        ("x-list", call(lambda m: m([[[1.0] * D]])), TypeError, r"x " + ad.not_array),
        ("x-None", call(lambda m: m(None)), TypeError, r"x " + ad.not_array),
        ("x-rank", call(lambda m: m(x((5, D)))), ValueError,
         r"x must be \[batch, T, d_model\] with d_model=6"),
        ("x-width", call(lambda m: m(x((2, 5, D + 1)))), ValueError,
         r"x has width 7, expected d_model=6"),
        ("x-batch-0", call(lambda m: m(x((0, 5, D)))), ValueError, r"x has batch size 0"),
        ("x_t-int", call(lambda m: m.step(x((2, D), np.int32))), TypeError,
         r"x_t must be a floating-point array"),
        ("x_t-rank", call(lambda m: m.step(x())), ValueError,
         r"x_t must be \[batch, d_model\]"),
        ("state-other-spec", lambda: ad.layer(spec)(x(), ad.state(OTHER, 2)), ValueError,
         r"state was made for another spec"),
        ("state-other-batch", with_state(lambda s: s, batch=1), ValueError,
         r"state\['\w+'\] has shape .*\(batch 2\)"),
        ("state-missing-array", with_state(lambda s: ad.without(s, _float_key(ad, s))),
         ValueError, r"state has arrays .* expects"),
        ("state-extra-array",
         with_state(lambda s: ad.replace(s, extra=ad.arrays(s)[_float_key(ad, s)])),
         ValueError, r"state has arrays .* expects"),
        ("state-float32", with_state(set_float(lambda a: ad.cast(a, np.float32))), ValueError,
         r"state\['\w+'\] has dtype .*float32, expected .*float64"),
        ("state-int", with_state(set_float(lambda a: ad.cast(a, np.int32))), ValueError,
         r"state\['\w+'\] has dtype .*int32, expected .*float64"),
        ("state-array-None", with_state(set_float(lambda a: None)), TypeError,
         r"state\['\w+'\] must be a"),
        ("state-array-list", with_state(set_float(lambda a: [0.0])), TypeError,
         r"state\['\w+'\] must be a"),
        ("state-truncated", with_state(set_float(lambda a: a[..., :0])), ValueError,
         r"state\['\w+'\] has shape"),
        ("state-pos-negative", with_state(lambda s: ad.with_pos(s, -1)), ValueError,
         r"pos.* must be a non-negative int"),
        ("state-pos-float", with_state(lambda s: ad.with_pos(s, 1.5)), ValueError,
         r"pos.* must be a"),
        ("state-not-a-state", with_state(lambda s: [s]), ad.not_state_exc, ad.not_state),
        ("params-missing", with_params(lambda p: p.pop(first)), ValueError,
         rf"missing \['{first}'\]"),
        ("params-extra", with_params(lambda p: p.update(bias=np.zeros(D))), ValueError,
         r"unexpected \['bias'\]"),
        ("params-misshapen", set_first(lambda a: np.zeros((1, 2))), ValueError,
         rf"{first}: expected shape .*, got \(1, 2\)"),
        ("params-int", set_first(lambda a: a.astype(np.int64)), TypeError,
         rf"params\['{first}'\] must be a floating-point array, got dtype int64"),
        ("params-bool", set_first(lambda a: a > 0), TypeError,
         rf"params\['{first}'\] must be a floating-point array, got dtype bool"),
        ("params-None-value", set_first(lambda a: None), TypeError,
         rf"params\['{first}'\] must be an array .*got NoneType"),
        ("params-list-value", set_first(lambda a: a.tolist()), TypeError,
         rf"params\['{first}'\] must be an array .*got list"),
        ("params-a-list", lambda: ad.realize(spec, list(params64(spec).values())),
         TypeError, r"params must be a dict of arrays, got list"),
        ("init-state-batch-0", call(lambda m: m.init_state(0)), ValueError,
         r"batch must be a positive int, got 0"),
        ("init-state-batch-float", call(lambda m: m.init_state(1.5)), ValueError,
         r"batch must be a positive int, got 1.5"),
        ("init-state-dtype-int", call(lambda m: m.init_state(1, dtype=ad.int_dtype)),
         TypeError, r"dtype must be a floating"),
    ]


def model_cases(ad: Adapter):
    V = MODEL.vocab_size

    def tok(shape=(2, 5), dtype=np.int64, value=1):
        return ad.arr(np.full(shape, value, dtype))

    def call(fn):
        return lambda: fn(ad.layer(MODEL))

    def with_state(mutate, batch=2):
        return lambda: ad.layer(MODEL)(tok(), mutate(ad.state(MODEL, batch)))

    def with_params(mutate):
        def fn():
            p = dict(params64(MODEL))
            mutate(p)
            return ad.realize(MODEL, p)
        return fn

    return [
        ("model-tokens-float", call(lambda m: m(tok(dtype=np.float64))), TypeError,
         r"tokens must hold integer token ids, got dtype .*float64"),
        ("model-tokens-bool", call(lambda m: m(tok(dtype=np.bool_))), TypeError,
         r"tokens must hold integer token ids, got dtype .*bool"),
        ("model-tokens-list", call(lambda m: m([[1, 2]])), TypeError,
         r"tokens " + ad.not_array),
        ("model-tokens-None", call(lambda m: m(None)), TypeError, r"tokens " + ad.not_array),
        ("model-tokens-rank", call(lambda m: m(tok((2, 5, 1)))), ValueError,
         r"tokens must be \[batch, T\]"),
        ("model-tokens-too-large", call(lambda m: m(tok(value=V))), ValueError,
         rf"tokens must lie in \[0, vocab_size={V}\)"),
        ("model-tokens-negative", call(lambda m: m(tok(value=-1))), ValueError,
         rf"tokens must lie in \[0, vocab_size={V}\)"),
        ("model-tokens-batch-0", call(lambda m: m(tok((0, 5)))), ValueError,
         r"tokens has batch size 0"),
        ("model-tokens_t-rank", call(lambda m: m.step(tok())), ValueError,
         r"tokens_t must be \[batch\]"),
        ("model-tokens_t-float", call(lambda m: m.step(tok((2,), np.float32))), TypeError,
         r"tokens_t must hold integer token ids"),
        ("model-state-of-a-layer", lambda: ad.layer(MODEL)(tok(), ad.state(LAYERS["mamba"], 2)),
         (ValueError, TypeError), r"state was made for another spec|state must be"),
        ("model-state-other-batch", with_state(lambda s: s, batch=1), ValueError,
         r"has shape .*\(batch 2\)"),
        ("model-state-not-a-state", with_state(lambda s: [s]), (ValueError, TypeError),
         r"state was made for another spec|state must be"),
        ("model-params-int", with_params(lambda p: p.update(
            {"embed.weight": p["embed.weight"].astype(np.int32)})), TypeError,
         r"params\['embed.weight'\] must be a floating-point array, got dtype int32"),
        ("model-params-missing", with_params(lambda p: p.pop("norm_f.weight")), ValueError,
         r"missing \['norm_f.weight'\]"),
        ("model-init-state-batch-negative", call(lambda m: m.init_state(-1)), ValueError,
         r"batch must be a positive int, got -1"),
    ]
