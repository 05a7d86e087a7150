"""JAX backend (jit, CPU) against the torch backend (CPU), float32, on the torch benchmark's
shapes (D=256, H=4, W=128, chunk 128, select 8, capacity 64): forward+backward time and
per-token streaming step latency, side by side in one run."""

from __future__ import annotations

import argparse

import numpy as np

import memcore

from .harness import machine, median_time, table
from .torch_cpu import D, specs


def _jax_fwd_bwd(spec, params, T: int, batch: int, repeat: int) -> float:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    layer = memcore.realize(spec, backend="jax", params=params)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, T, D)), jnp.float32)

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss(mod, x):
        y, _ = mod(x)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    def run():
        v, g = loss(layer, x)
        jax.block_until_ready(g)

    return median_time(run, repeat=repeat, warmup=1, budget_s=60)


def _torch_fwd_bwd(spec, params, T: int, batch: int, repeat: int) -> float:
    from .torch_cpu import fwd_bwd_time

    return fwd_bwd_time(memcore.realize(spec, backend="torch", params=params), T, batch, repeat)


def _jax_step(spec, params, t: int, steps: int) -> float:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    layer = memcore.realize(spec, backend="jax", params=params)
    _, state = layer(jnp.asarray(np.random.default_rng(0).standard_normal((1, t, D)),
                                 jnp.float32))
    x = jnp.zeros((1, D), jnp.float32)
    step = eqx.filter_jit(lambda mod, x, s: mod.step(x, s))

    def run():
        nonlocal state
        y, state = step(layer, x, state)
        jax.block_until_ready(y)

    return median_time(run, repeat=steps, warmup=3)


def _torch_step(spec, params, t: int, steps: int) -> float:
    from .torch_cpu import step_latency

    return step_latency(memcore.realize(spec, backend="torch", params=params), t, steps)[0]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks jax_cpu", description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--stream", type=int, default=1024, help="prefix length before stepping")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layers", nargs="+", default=["bmojo", "bmojo_f", "mamba", "mosaic",
                                                    "transformer(None)"])
    args = p.parse_args(argv)
    import jax

    print(f"machine: {machine()}, jax {jax.__version__} ({jax.devices()[0].platform})")
    print(f"float32, D={D}, batch={args.batch}\n")
    rows = []
    for name in args.layers:
        spec = specs()[name]
        params = memcore.init(spec, 0)
        for T in args.lengths:
            tt = _torch_fwd_bwd(spec, params, T, args.batch, args.repeat)
            tj = _jax_fwd_bwd(spec, params, T, args.batch, args.repeat)
            rows.append([name, T, tt, tj, tj / tt])
    print("forward+backward, median seconds:")
    print(table(["layer", "T", "torch s", "jax s", "jax / torch"], rows))
    rows = []
    for name in ("bmojo", "bmojo_f", "mamba"):
        if name not in args.layers:
            continue
        spec = specs()[name]
        params = memcore.init(spec, 0)
        ts = _torch_step(spec, params, args.stream, args.steps)
        js = _jax_step(spec, params, args.stream, args.steps)
        rows.append([name, ts * 1e3, js * 1e3, js / ts])
    print(f"\nstreaming step latency after {args.stream} tokens (batch 1), median ms:")
    print(table(["layer", "torch ms", "jax ms", "jax / torch"], rows))


if __name__ == "__main__":
    main()
