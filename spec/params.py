"""Parameter names, shapes and initial values for every spec (``memcore.init``).

Names are stable and the same for every backend. Linear weights use torch's [out, in] layout.
Each parameter draws from its own generator seeded by (seed, name), so a parameter has the same
initial value in every spec that has it: ``init(bmojo(...))`` restricted to ``bmojo_f``'s names
equals ``init(bmojo_f(...))`` for the same arguments and seed.

transformer: q_proj.weight, o_proj.weight [D, D]; k_proj.weight, v_proj.weight [Hkv E, D]
    (Hkv = n_kv_heads, E = head_dim: [D, D] without grouped-query attention).
mamba (mamba-ssm's Mamba names): in_proj.weight [2Di, D], conv1d.weight [Di, 1, K],
    conv1d.bias [Di], x_proj.weight [R + 2N, Di], dt_proj.weight [Di, R], dt_proj.bias [Di],
    A_log [Di, N], D [Di], out_proj.weight [D, Di]; with inner_norm_eps (Jamba's names)
    dt_layernorm.weight [R], b_layernorm.weight [N], c_layernorm.weight [N].
bmojo_f: transformer's; fading.<mamba names> if fading; k_fading_proj.weight and
    v_fading_proj.weight [D, D] if not tie_fading.
bmojo: bmojo_f's; pred_proj.weight [D, D] (the innovation predictor) if fading.
mosaic: k_proj.weight, v_proj.weight, o_proj.weight [D, D]; leak, k_scale, v_scale, v_mix [H].
persistent: k_proj.weight, o_proj.weight [D, D]; leak, k_scale, out_scale [H];
    mem_k, mem_v [H, P, E].
model: embed.weight [V, D]; layers.{i}.norm1.weight [D]; layers.{i}.conv.weight [D, K] if
    short_conv = K > 0 (w[:, k] multiplies the input k - K + 1 steps back, U(+-1/sqrt(K)) as
    torch's depthwise Conv1d); layers.{i}.mixer.<layer names>;
    with an ffn, layers.{i}.norm2.weight [D] and layers.{i}.ffn.<names> (mlp: fc1.weight
    [F, D], fc2.weight [D, F]; swiglu: gate_proj.weight, up_proj.weight [F, D],
    down_proj.weight [D, F]; F = d_ff or mlp_ratio * D; or the persistent names);
    norm_f.weight [D]; lm_head.weight [V, D] if not tie_embeddings.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np

from .base import Spec
from .layers import BMojo, BMojoF, Mamba, Mosaic, Persistent, Transformer
from .model import Model
from .sizes import check_allocation
from .validate import check_param_arrays

Init = Callable[[np.random.Generator, tuple], np.ndarray]


def _uniform_fan_in(fan_in: int) -> Init:
    # torch.nn.Linear / Conv1d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return lambda rng, shape: rng.uniform(-bound, bound, shape)


def _normal(std: float) -> Init:
    return lambda rng, shape: rng.normal(0.0, std, shape)


def _const(value: float) -> Init:
    return lambda rng, shape: np.full(shape, value)


def _linspace(lo: float, hi: float) -> Init:
    return lambda rng, shape: np.linspace(lo, hi, shape[0])


def _mamba_table(spec: Mamba) -> dict[str, tuple[tuple, Init]]:
    D, Di, N, K, R = spec.d_model, spec.d_inner, spec.d_state, spec.d_conv, spec.dt_rank_value

    def dt_bias(rng, shape):
        # mamba-ssm: dt ~ logU(1e-3, 1e-1) floored at 1e-4; bias = softplus^{-1}(dt).
        dt = np.exp(rng.uniform(0, 1, shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = np.maximum(dt, 1e-4)
        return dt + np.log(-np.expm1(-dt))

    def a_log(rng, shape):
        return np.log(np.broadcast_to(np.arange(1, N + 1, dtype=np.float64), shape))

    table = {
        "in_proj.weight": ((2 * Di, D), _uniform_fan_in(D)),
        "conv1d.weight": ((Di, 1, K), _uniform_fan_in(K)),
        "conv1d.bias": ((Di,), _uniform_fan_in(K)),
        "x_proj.weight": ((R + 2 * N, Di), _uniform_fan_in(Di)),
        "dt_proj.weight": ((Di, R), lambda rng, s: rng.uniform(-R ** -0.5, R ** -0.5, s)),
        "dt_proj.bias": ((Di,), dt_bias),
        "A_log": ((Di, N), a_log),
        "D": ((Di,), _const(1.0)),
        "out_proj.weight": ((D, Di), _uniform_fan_in(Di)),
    }
    if spec.inner_norm_eps is not None:
        table.update({"dt_layernorm.weight": ((R,), _const(1.0)),
                      "b_layernorm.weight": ((N,), _const(1.0)),
                      "c_layernorm.weight": ((N,), _const(1.0))})
    return table


def _attention_table(spec) -> dict[str, tuple[tuple, Init]]:
    D = spec.d_model
    kv = getattr(spec, "n_kv_heads", spec.n_heads) * spec.head_dim
    return {f"{n}_proj.weight": ((kv if n in "kv" else D, D), _uniform_fan_in(D))
            for n in "qkvo"}


def _table(spec: Spec) -> dict[str, tuple[tuple, Init]]:
    if isinstance(spec, Transformer):
        return _attention_table(spec)
    if isinstance(spec, Mamba):
        return _mamba_table(spec)
    if isinstance(spec, BMojoF):  # also BMojo
        D = spec.d_model
        table = _attention_table(spec)
        if spec.fading:
            table.update({f"fading.{n}": v for n, v in _mamba_table(spec.fading_block).items()})
            if not spec.tie_fading:
                table["k_fading_proj.weight"] = ((D, D), _uniform_fan_in(D))
                table["v_fading_proj.weight"] = ((D, D), _uniform_fan_in(D))
            if isinstance(spec, BMojo):
                table["pred_proj.weight"] = ((D, D), _uniform_fan_in(D))
        return table
    if isinstance(spec, Mosaic):
        D, H = spec.d_model, spec.n_heads
        return {
            "k_proj.weight": ((D, D), _normal(D ** -0.5)),
            "v_proj.weight": ((D, D), _normal(D ** -0.5)),
            "o_proj.weight": ((D, D), _normal(D ** -0.5)),
            # Memory Mosaics' initial values: decay exp(-10|p|) from e^-0.5 to e^-5,
            # key scale e^1, value scale e^-0.5, value mix U(0, 1).
            "leak": ((H,), _linspace(0.05, 0.5)),
            "k_scale": ((H,), _const(0.1)),
            "v_scale": ((H,), _const(-0.05)),
            "v_mix": ((H,), lambda rng, s: rng.uniform(0.0, 1.0, s)),
        }
    if isinstance(spec, Persistent):
        D, H, P, E = spec.d_model, spec.n_heads, spec.slots, spec.head_dim
        return {
            "k_proj.weight": ((D, D), _normal(D ** -0.5)),
            "o_proj.weight": ((D, D), _normal(D ** -0.5)),
            "leak": ((H,), _linspace(0.05, 0.5)),
            "k_scale": ((H,), _const(0.1)),
            "out_scale": ((H,), _const(-0.05)),
            "mem_k": ((H, P, E), _normal(E ** -0.5)),
            "mem_v": ((H, P, E), _normal(E ** -0.5)),
        }
    if isinstance(spec, Model):
        D, V = spec.d_model, spec.vocab_size
        table = {"embed.weight": ((V, D), _normal(D ** -0.5))}
        for i, layer in enumerate(spec.layers):
            table[f"layers.{i}.norm1.weight"] = ((D,), _const(1.0))
            if spec.short_conv:
                K = spec.short_conv
                table[f"layers.{i}.conv.weight"] = ((D, K), _uniform_fan_in(K))
            table.update({f"layers.{i}.mixer.{n}": v for n, v in _table(layer).items()})
            if spec.ffn is not None:
                table[f"layers.{i}.norm2.weight"] = ((D,), _const(1.0))
                F = spec.ffn_width
                if spec.ffn == "mlp":
                    table[f"layers.{i}.ffn.fc1.weight"] = ((F, D), _uniform_fan_in(D))
                    table[f"layers.{i}.ffn.fc2.weight"] = ((D, F), _uniform_fan_in(F))
                elif spec.ffn == "swiglu":
                    for n in ("gate_proj", "up_proj"):
                        table[f"layers.{i}.ffn.{n}.weight"] = ((F, D), _uniform_fan_in(D))
                    table[f"layers.{i}.ffn.down_proj.weight"] = ((D, F), _uniform_fan_in(F))
                else:
                    table.update({f"layers.{i}.ffn.{n}": v for n, v in _table(spec.ffn).items()})
        table["norm_f.weight"] = ((D,), _const(1.0))
        if not spec.tie_embeddings:
            table["lm_head.weight"] = ((V, D), _normal(D ** -0.5))
        return table
    raise TypeError(f"spec must be a memcore spec, got {spec!r}")


def param_shapes(spec: Spec) -> dict[str, tuple]:
    """Every parameter name of ``spec`` with its shape."""
    return {name: shape for name, (shape, _) in _table(spec).items()}


def init(spec: Spec, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Initial parameters of ``spec``: a dict of numpy arrays, usable by every backend."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"init: seed must be a non-negative int, got {seed!r}")
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"init: dtype must be a floating dtype, got {dtype}")
    check_allocation(spec, what="params", dtype_bytes=dtype.itemsize)
    out = {}
    for name, (shape, fn) in _table(spec).items():
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
        out[name] = np.ascontiguousarray(fn(rng, shape), dtype=dtype)
    return out


def check_params(spec: Spec, params: dict) -> None:
    """Raise a ValueError naming every missing, unexpected or misshapen parameter."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    want = param_shapes(spec)
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    check_param_arrays({n: params[n] for n in want if n in params})
    bad = [f"{n}: expected shape {want[n]}, got {tuple(params[n].shape)}"
           for n in want if n in params and tuple(params[n].shape) != want[n]]
    if missing or extra or bad:
        lines = []
        if missing:
            lines.append(f"missing {missing}")
        if extra:
            lines.append(f"unexpected {extra}")
        lines.extend(bad)
        raise ValueError(f"params do not match the {spec.kind} spec: " + "; ".join(lines))
