"""Nonsense specs and sizes: negative, zero, float, bool, string and huge arguments, heads that do
not divide the width, unknown choices, bad JSON, unknown backends, and specs whose parameters or
state would exceed the allocation limit (refused before anything is allocated, naming the
argument and the bytes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import memcore
from memcore import spec as S

BAD_COUNTS = [(-1, ValueError, ">= 1"), (0, ValueError, ">= 1"), (2.5, TypeError, "an int"),
              (True, TypeError, "an int"), ("8", TypeError, "an int"), (None, TypeError, "an int")]


def _constructor_cases():
    out = []

    def add(kind, make, arg, value, exc, why):
        out.append((f"{kind}-{arg}={value!r}", lambda: make(value), exc,
                    rf"\b{arg} must be .*{why}" if why else rf"\b{arg}\b"))

    for value, exc, why in BAD_COUNTS:
        add("transformer", lambda v: S.transformer(v, 2), "d_model", value, exc, why)
        add("transformer", lambda v: S.transformer(8, v), "n_heads", value, exc, why)
        add("mamba", lambda v: S.mamba(v), "d_model", value, exc, why)
        add("mamba", lambda v: S.mamba(8, d_state=v), "d_state", value, exc, why)
        add("mamba", lambda v: S.mamba(8, d_conv=v), "d_conv", value, exc, why)
        add("mamba", lambda v: S.mamba(8, expand=v), "expand", value, exc, why)
        add("persistent", lambda v: S.persistent(8, 2, slots=v), "slots", value, exc, why)
        if value is not None:  # None means "unbounded" for these
            add("transformer", lambda v: S.transformer(8, 2, window=v), "window", value, exc,
                why if exc is ValueError else "an int or None")
            add("mosaic", lambda v: S.mosaic(8, 2, capacity=v), "capacity", value, exc,
                why if exc is ValueError else "an int or None")
            add("bmojo_f", lambda v: S.bmojo_f(8, 2, window=v), "window", value, exc, why)
            add("bmojo", lambda v: S.bmojo(8, 2, 4, chunk=v, select=0, capacity=1), "chunk",
                value, exc, why)
        add("model", lambda v: S.model([S.mamba(4)], v), "vocab_size", value, exc, why)
    for value in (0, -1, 2.5, "big", True):
        exc = ValueError if value in (0, -1) and value is not True else TypeError
        add("mamba", lambda v: S.mamba(8, dt_rank=v), "dt_rank", value, exc,
            ">= 1" if exc is ValueError else "an int")
    for value, exc in ((-1, ValueError), (4, ValueError), (1.5, TypeError), (True, TypeError)):
        add("bmojo", lambda v: S.bmojo(8, 2, 4, chunk=3, select=v, capacity=1), "select", value,
            exc, "")
    for value, exc in ((-1, ValueError), (2.5, TypeError), (None, TypeError), (True, TypeError)):
        add("bmojo", lambda v: S.bmojo(8, 2, 4, chunk=3, select=1, capacity=v), "capacity",
            value, exc, "")
    for value in (1, "yes", None):
        add("bmojo_f", lambda v: S.bmojo_f(8, 2, 4, tie_fading=v), "tie_fading", value,
            TypeError, "a bool")
        add("bmojo_f", lambda v: S.bmojo_f(8, 2, 4, fading=v), "fading", value, TypeError,
            "a bool")
    for value in ("alibi", None, 1, "ROPE"):
        add("transformer", lambda v: S.transformer(8, 2, positions=v), "positions", value,
            ValueError, "one of")
        add("bmojo", lambda v: S.bmojo(8, 2, 4, 3, 1, 1, positions=v), "positions", value,
            ValueError, "one of")
    for value in (0, -1, 1.5):
        add("model", lambda v: S.model([S.mamba(4)], 5, mlp_ratio=v), "mlp_ratio", value,
            ValueError if isinstance(value, int) else TypeError, "")
    for value, exc in ((0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                       (math.inf, ValueError), ("1", TypeError), (True, TypeError)):
        add("model", lambda v: S.model([S.mamba(4)], 5, logit_scale=v), "logit_scale", value,
            exc, "")
    for value in ("batch", None, 3):
        add("model", lambda v: S.model([S.mamba(4)], 5, norm=v), "norm", value, ValueError,
            "one of")
    for value in ("moe", 3, "MLP"):
        add("model", lambda v: S.model([S.mamba(4)], 5, ffn=v), "ffn", value, ValueError, "")
    # heads that do not divide the width
    for name, make in (("transformer", lambda: S.transformer(7, 2)),
                       ("bmojo_f", lambda: S.bmojo_f(6, 4, window=2)),
                       ("bmojo", lambda: S.bmojo(9, 2, 2, 3, 1, 1)),
                       ("mosaic", lambda: S.mosaic(6, 4)),
                       ("persistent", lambda: S.persistent(10, 3, slots=2))):
        out.append((f"{name}-heads-not-dividing", make, ValueError,
                    r"d_model=\d+ is not divisible by n_heads=\d+"))
    out += [
        ("model-no-layers", lambda: S.model([], 5), ValueError, r"layers must be a non-empty"),
        ("model-layers-None", lambda: S.model(None, 5), ValueError,
         r"layers must be a non-empty"),
        ("model-layer-string", lambda: S.model(["mamba"], 5), TypeError,
         r"layers\[0\] must be a layer spec"),
        ("model-layer-primitive", lambda: S.model([S.mamba(4).scan], 5), TypeError,
         r"layers\[0\] must be a layer spec"),
        ("model-widths-differ", lambda: S.model([S.mamba(4), S.mamba(6)], 5), ValueError,
         r"layers\[1\].d_model=6 differs"),
        ("jamba-pattern-letters", lambda: S.jamba(8, 2, pattern="MXA"), ValueError,
         r"pattern must be a non-empty string of 'M' and 'A'"),
        ("jamba-pattern-int", lambda: S.jamba(8, 2, pattern=5), ValueError,
         r"pattern must be a non-empty string"),
        ("jamba-n-layers-zero", lambda: S.jamba(8, 2, n_layers=0), ValueError,
         r"n_layers must be >= 1"),
        ("jamba-n-layers-float", lambda: S.jamba(8, 2, n_layers=2.5), TypeError,
         r"n_layers must be an int"),
    ]
    return out


def _json_cases():
    return [
        ("json-unknown-kind", lambda: S.from_json('{"kind": "rwkv"}'), ValueError,
         r"unknown kind 'rwkv'"),
        ("json-no-kind", lambda: S.from_json('{"d_model": 4}'), ValueError,
         r"must be an object with a 'kind' field"),
        ("json-not-object", lambda: S.from_json("[1, 2]"), ValueError,
         r"must be an object with a 'kind' field"),
        ("json-unknown-field", lambda: S.from_json('{"kind": "mamba", "d_model": 4, "x": 1}'),
         ValueError, r"unknown fields \['x'\]"),
        ("json-malformed", lambda: S.from_json('{"kind": "mamba", '), ValueError,
         r"spec JSON is not valid JSON"),
        ("json-string-width", lambda: S.from_json('{"kind": "mamba", "d_model": "4"}'),
         TypeError, r"d_model must be an int, got '4'"),
        ("json-negative-window",
         lambda: S.from_json('{"kind": "transformer", "d_model": 4, "n_heads": 2, '
                             '"window": -2}'), ValueError, r"window must be >= 1"),
        ("json-bad-layer",
         lambda: S.from_json('{"kind": "model", "vocab_size": 5, "layers": '
                             '[{"kind": "mamba", "d_model": 0}]}'), ValueError,
         r"d_model must be >= 1, got 0"),
        ("json-not-text", lambda: S.from_json(None), TypeError, r"spec JSON must be a str"),
    ]


def _size_cases():
    """Allocations beyond the limit (default 16 GiB), refused before they are made."""
    out = [
        ("init-d_state-huge", lambda: memcore.init(S.mamba(32, d_state=2**40)), ValueError,
         r"mamba: d_state=1099511627776 asks for parameters of 768.0 TiB"),
        ("init-d_model-huge", lambda: memcore.init(S.transformer(10**6, 1)), ValueError,
         r"transformer: d_model=1000000 asks for parameters"),
        ("init-vocab-huge", lambda: memcore.init(S.model([S.mamba(8)], 10**12)), ValueError,
         r"model: vocab_size=1000000000000 asks for parameters"),
        ("init-mlp-ratio-huge",
         lambda: memcore.init(S.model([S.transformer(8, 2)], 5, mlp_ratio=10**10)), ValueError,
         r"model: mlp_ratio=10000000000 asks for parameters"),
        ("init-slots-huge", lambda: memcore.init(S.persistent(8, 2, slots=10**11)), ValueError,
         r"persistent: slots=100000000000 asks for parameters"),
        ("init-expand-huge", lambda: memcore.init(S.mamba(8, expand=10**10)), ValueError,
         r"mamba: expand=10000000000 asks for parameters"),
    ]
    huge_state = [
        ("window", S.transformer(32, 2, window=10**12), r"window=1000000000000"),
        ("fading-window", S.bmojo_f(8, 2, window=10**11, d_state=2), r"window=100000000000"),
        ("capacity", S.bmojo(8, 2, 2, chunk=2, select=1, capacity=10**11, d_state=2),
         r"capacity=100000000000"),
        ("select", S.bmojo(8, 2, 2, chunk=10**12, select=10**11, capacity=1, d_state=2),
         r"select=100000000000"),
        ("mosaic-capacity", S.mosaic(8, 2, capacity=10**11), r"capacity=100000000000"),
        ("model-layer-window", S.jamba(8, 2, pattern="MA", window=10**12),
         r"layers\[1\].window=1000000000000"),
    ]
    for backend in ("reference", "torch", "jax"):
        for name, spec, arg in huge_state:
            out.append((f"realize-{backend}-{name}",
                        lambda spec=spec, backend=backend: memcore.realize(spec, backend=backend),
                        ValueError, rf"{arg} asks for a state of .* \(\d+ bytes, batch 1\), "
                                    rf"beyond the allocation limit of 16.0 GiB"))
        out.append((f"init-state-{backend}-batch-huge",
                    lambda backend=backend: memcore.realize(S.mamba(16), backend=backend)
                    .init_state(10**9), ValueError, r"batch=1000000000 asks for a state"))
        if backend != "reference":  # the reference does not lay chunks out whole
            out.append((f"forward-{backend}-chunk-huge",
                        lambda backend=backend: _forward(backend, S.bmojo(
                            8, 2, 2, chunk=10**12, select=1, capacity=1, d_state=2)),
                        ValueError, r"bmojo: chunk=1000000000000 asks for a chunk layout of "
                                    r".* in the parallel form"))
            out.append((f"forward-{backend}-model-chunk-huge",
                        lambda backend=backend: _forward(backend, S.model(
                            [S.bmojo(8, 2, 2, chunk=2**40, select=2, capacity=3, d_state=2)], 5)),
                        ValueError, r"model: layers\[0\].chunk=1099511627776 asks for a chunk "
                                    r"layout"))
        out.append((f"init-state-{backend}-max-len-huge",
                    lambda backend=backend: memcore.realize(S.transformer(8, 2), backend=backend)
                    .init_state(1, max_len=10**12), ValueError,
                    r"max_len=1000000000000 asks for a state"))
    return out


def _forward(backend, spec):
    """A parallel call of two tokens on ``backend``."""
    layer = memcore.realize(spec, backend=backend)
    is_model = isinstance(spec, S.Model)
    x = np.ones((1, 2), np.int64) if is_model else np.ones((1, 2, spec.d_model), np.float32)
    if backend == "torch":
        import torch

        x = torch.from_numpy(x)
    return layer(x)


def _api_cases():
    spec = S.transformer(4, 2)
    nan = dict(memcore.init(spec), **{"q_proj.weight": np.full((4, 4), np.nan, np.float32)})
    return [
        ("backend-unknown", lambda: memcore.realize(spec, backend="tpu"), ValueError,
         r"backend must be one of .*, got 'tpu'"),
        ("backend-empty", lambda: memcore.realize(spec, backend=""), ValueError,
         r"backend must be one of"),
        ("backend-None", lambda: memcore.realize(spec, backend=None), TypeError,
         r"backend must be a backend name"),
        ("realize-not-a-spec", lambda: memcore.realize("transformer"), TypeError,
         r"spec must be a memcore layer or model spec"),
        ("realize-primitive-spec", lambda: memcore.realize(S.mamba(4).scan), TypeError,
         r"spec must be a memcore layer or model spec"),
        ("realize-check-nan", lambda: memcore.realize(spec, params=nan, check=True), ValueError,
         r"params hold non-finite values: q_proj.weight"),
        ("init-not-a-spec", lambda: memcore.init({"kind": "mamba"}), TypeError,
         r"spec must be a memcore"),
        ("init-seed-negative", lambda: memcore.init(spec, seed=-1), ValueError,
         r"seed must be a non-negative int"),
        ("init-seed-float", lambda: memcore.init(spec, seed=1.5), ValueError,
         r"seed must be a non-negative int"),
        ("init-dtype-int", lambda: memcore.init(spec, dtype=np.int32), TypeError,
         r"dtype must be a floating dtype"),
        ("init-dtype-bool", lambda: memcore.init(spec, dtype=bool), TypeError,
         r"dtype must be a floating dtype"),
        ("register-backend-empty-name", lambda: memcore.register_backend("", print),
         ValueError, r"name must be a non-empty string"),
        ("register-backend-not-callable", lambda: memcore.register_backend("mine", 3),
         TypeError, r"factory must be callable"),
    ]


CASES = [pytest.param(fn, exc, pattern, id=name)
         for name, fn, exc, pattern in (_constructor_cases() + _json_cases() + _size_cases()
                                        + _api_cases())]


@pytest.mark.parametrize("fn,exc,pattern", CASES)
def test_bad_spec(fn, exc, pattern, limited):
    limited(fn, exc, pattern)
