"""JAX backend (jit, CPU) against the torch backend (CPU), float32, on the torch benchmark's
shapes (D=256, H=4, W=128, chunk 128, select 8, capacity 64): forward+backward time and
per-token streaming step latency, side by side in one run.

Forward+backward: the two frameworks take turns run by run (torch, then JAX, ``repeat``
times, after one warm-up run each, which also compiles JAX), so a slow spell of a shared
machine falls on both alike; each time is the median of its runs, and the ratio is taken per
layer and length from those medians."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import memcore

from .harness import machine, median_time, table
from .torch_cpu import D, specs

TARGET = 2.0  # JAX / torch forward+backward for mamba, bmojo_f and bmojo at 1K and 4K


def _jax_fwd_bwd_runner(spec, params, T: int, batch: int):
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

    return run


def interleaved(runs: dict, repeat: int) -> dict:
    """Median seconds of each runner, the runners taking turns (one warm-up run each)."""
    for run in runs.values():
        run()
    got = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            got[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in got.items()}


def fwd_bwd_pair(spec, params, T: int, batch: int, repeat: int) -> tuple[float, float]:
    """(torch s, jax s): forward+backward medians of one layer, timed interleaved."""
    from .torch_cpu import fwd_bwd_runner

    runs = {"torch": fwd_bwd_runner(memcore.realize(spec, backend="torch", params=params),
                                    T, batch),
            "jax": _jax_fwd_bwd_runner(spec, params, T, batch)}
    got = interleaved(runs, repeat)
    return got["torch"], got["jax"]


def set_threads(n: int) -> None:
    """Both frameworks on ``n`` threads: torch's intra-op pool, and XLA's CPU client through
    XLA_FLAGS (read when JAX starts, so before its first import)."""
    import sys

    import torch

    if "jax" in sys.modules:
        raise RuntimeError("threads: set before JAX is imported")
    torch.set_num_threads(n)
    flag = ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if n == 1
            else f"intra_op_parallelism_threads={n}")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def threads() -> str:
    """The thread counts both frameworks run with (XLA's CPU client uses every core the
    process may run on unless XLA_FLAGS says otherwise)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = os.environ.get("XLA_FLAGS", "")
    xla = (f"XLA CPU as XLA_FLAGS={flags!r} sets" if flags
           else f"XLA CPU on all {cores} cores")
    return f"torch {torch.get_num_threads()} intra-op threads; {xla}"


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


def parts_table(T: int, repeat: int) -> str:
    """Where the mamba layer's JAX/torch ratio comes from: forward+backward of its parts alone,
    timed interleaved: the selective scan primitive at the layer's shape (channels 2D, d_state
    16, softplus, D and z) and its input projection ([T, D] @ [D, 4D])."""
    import jax
    import jax.numpy as jnp
    import torch
    from memcore.backends.jax.selective_scan import selective_scan as jax_scan
    from memcore.backends.torch.selective_scan import selective_scan as torch_scan

    rng = np.random.default_rng(0)
    Dc, N = 2 * D, 16
    shapes = [(1, Dc, T), (1, Dc, T), (Dc, N), (1, N, T), (1, N, T), (Dc,), (1, Dc, T), (Dc,)]
    scan_in = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    scan_in[2] = -np.abs(scan_in[2]) - 0.5  # A < 0
    proj_in = [rng.standard_normal((T, D)).astype(np.float32),
               rng.standard_normal((D, 4 * D)).astype(np.float32)]

    def torch_runner(f, arrays):
        ts = [torch.tensor(a, requires_grad=True) for a in arrays]
        return lambda: torch.autograd.grad(f(*ts).pow(2).mean(), ts)

    def jax_runner(f, arrays):
        js = [jnp.asarray(a) for a in arrays]
        g = jax.jit(jax.grad(lambda *a: jnp.mean(f(*a) ** 2), argnums=tuple(range(len(js)))))
        return lambda: jax.block_until_ready(g(*js))

    parts = {"selective_scan": (lambda *a: torch_scan(*a, delta_softplus=True),
                                lambda *a: jax_scan(*a, delta_softplus=True), scan_in),
             "in_proj matmul": (lambda x, w: x @ w, lambda x, w: x @ w, proj_in)}
    rows = []
    for name, (tf, jf, arrays) in parts.items():
        got = interleaved({"torch": torch_runner(tf, arrays), "jax": jax_runner(jf, arrays)},
                          repeat)
        rows.append([name, T, got["torch"] * 1e3, got["jax"] * 1e3, got["jax"] / got["torch"]])
    return table(["part", "T", "torch ms", "jax ms", "jax / torch"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks jax_cpu", description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--stream", type=int, default=1024, help="prefix length before stepping")
    p.add_argument("--steps", type=int, default=30, help="0: no streaming table")
    p.add_argument("--layers", nargs="+", default=["bmojo", "bmojo_f", "mamba", "mosaic",
                                                    "transformer(None)"])
    p.add_argument("--parts", type=int, default=4096, help="T of the mamba parts table (0: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both frameworks (default: each framework's own)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads: expected a positive count, got {args.threads}")
        set_threads(args.threads)
    import jax

    print(f"machine: {machine()}, jax {jax.__version__} ({jax.devices()[0].platform})")
    print(f"threads: {threads()}")
    print(f"float32, D={D}, batch={args.batch}, {args.repeat} interleaved runs each\n")
    rows = []
    for name in args.layers:
        spec = specs()[name]
        params = memcore.init(spec, 0)
        for T in args.lengths:
            tt, tj = fwd_bwd_pair(spec, params, T, args.batch, args.repeat)
            goal = f"<= {TARGET:g}" if name in ("mamba", "bmojo_f", "bmojo") else ""
            rows.append([name, T, tt, tj, tj / tt, goal])
    print("forward+backward, median seconds:")
    print(table(["layer", "T", "torch s", "jax s", "jax / torch", "goal"], rows))
    rows = []
    for name in ("bmojo", "bmojo_f", "mamba") if args.steps > 0 else ():
        if name not in args.layers:
            continue
        spec = specs()[name]
        params = memcore.init(spec, 0)
        ts = _torch_step(spec, params, args.stream, args.steps)
        js = _jax_step(spec, params, args.stream, args.steps)
        rows.append([name, ts * 1e3, js * 1e3, js / ts])
    if rows:
        print(f"\nstreaming step latency after {args.stream} tokens (batch 1), median ms:")
        print(table(["layer", "torch ms", "jax ms", "jax / torch"], rows))
    if args.parts > 0:
        print("\nthe mamba layer's parts alone, forward+backward, median ms:")
        print(parts_table(args.parts, args.repeat))


if __name__ == "__main__":
    main()
