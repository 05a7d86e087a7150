"""Torch backend on CPU, float32: the targets of the torch backend's benchmarks.

1. forward+backward time of bmojo, bmojo_f, mamba and mosaic against full causal attention
   (transformer(None), SDPA) at several T; goals: bmojo <= 0.5x full attention at T=8192,
   bmojo's time grows <= 4.5x from 4K to 16K.
2. streaming: per-token step latency at t=1K and t=32K (goal: ratio <= 1.2), state bytes.
3. mosaic's readout against a dense O(T^2) leaky average at T=2048 (goal: >= 2x faster).
4. the matmul floor: each layer's forward+backward matrix-product FLOPs (counted by
   ``torch.utils.flop_counter``) over this machine's sgemm rate at the same thread count;
   goal: bmojo at T=8192 within 1.4x of its floor at 1 and at 2 threads.
5. the profile behind the floor ratio: one forward+backward of a layer under torch.profiler,
   its operators by self CPU time, with the matrix products' share.

Shapes: D=256, H=4, W=128, chunk 128, select 8, capacity 64 (DESIGN's notation).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import memcore

from .harness import machine, median_time, table

D, H, W, CHUNK, SELECT, CAPACITY, N = 256, 4, 128, 128, 8, 64, 16


def specs():
    S = memcore.spec
    return {
        "transformer(None)": S.transformer(D, H),
        "bmojo": S.bmojo(D, H, window=W, chunk=CHUNK, select=SELECT, capacity=CAPACITY,
                         d_state=N),
        "bmojo_f": S.bmojo_f(D, H, window=W, d_state=N),
        "mamba": S.mamba(D, d_state=N),
        "mosaic": S.mosaic(D, H),
    }


def layer(spec):
    return memcore.realize(spec, backend="torch", params=memcore.init(spec, 0))


def fwd_bwd_runner(module, T: int, batch: int):
    x = torch.randn(batch, T, D, requires_grad=True)

    def run():
        module.zero_grad(set_to_none=True)
        y, _ = module(x)
        y.float().pow(2).mean().backward()

    return run


def fwd_bwd_time(module, T: int, batch: int, repeat: int) -> float:
    """Median forward+backward seconds of one module (alone)."""
    return median_time(fwd_bwd_runner(module, T, batch), repeat=repeat, warmup=1, budget_s=60)


def training_table(lengths, batch: int, repeat: int, names):
    """Forward+backward medians per length; the models of one length take turns run by run
    (attention, then each layer, ``repeat`` times), so their ratios see the same machine."""
    import time

    mods = {name: layer(spec) for name, spec in specs().items()}
    order = ["transformer(None)", *names]
    rows, times = [], {}
    for T in lengths:
        runs = {name: fwd_bwd_runner(mods[name], T, batch) for name in order}
        for name in order:  # warm-up
            runs[name]()
        got = {name: [] for name in order}
        for _ in range(repeat):
            for name in order:
                t0 = time.perf_counter()
                runs[name]()
                got[name].append(time.perf_counter() - t0)
        for name in order:
            times[(name, T)] = statistics.median(got[name])
        base = times[("transformer(None)", T)]
        row = [T, base]
        for name in names:
            row += [times[(name, T)], times[(name, T)] / base]
        rows.append(row)
    header = ["T", "attention s"]
    for name in names:
        header += [f"{name} s", f"{name} / attn"]
    return table(header, rows), times


SGEMM_SHAPES = ((2048, 2048, 2048), (8192, 256, 1024), (8192, 1024, 256))


def sgemm_rate(repeat: int = 5) -> float:
    """This machine's float32 matmul rate (FLOP/s) at torch's current thread count: the best of
    a square product and the projection shapes of the layers (m x k @ k x n), each timed as a
    median, so the floor derived from it is one the layers could reach."""
    best = 0.0
    for m, k, n in SGEMM_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        t = median_time(lambda a=a, b=b: a @ b, repeat=repeat, warmup=2)
        best = max(best, 2.0 * m * k * n / t)
    return best


def matmul_flops(module, T: int, batch: int) -> int:
    """FLOPs of the matrix products (matmuls, attention, convolutions) of one forward+backward."""
    from torch.utils.flop_counter import FlopCounterMode

    run = fwd_bwd_runner(module, T, batch)
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def floor_table(T: int, batch: int, repeat: int, names):
    """Each layer's forward+backward time against its matmul floor (its matmul FLOPs at the
    sgemm rate measured in the same run), and the rate itself."""
    rate = sgemm_rate()
    rows = []
    for name in ["transformer(None)", *names]:
        mod = layer(specs()[name])
        flops = matmul_flops(mod, T, batch)
        t = fwd_bwd_time(mod, T, batch, repeat)
        floor = flops / rate
        rows.append([name, flops / 1e9, floor, t, t / floor])
    header = ["layer", "matmul GFLOP", "floor s", "time s", "time / floor"]
    return rate, table(header, rows)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
              "aten::convolution_backward", "aten::_convolution", "aten::mkldnn_convolution")


def profile_table(name: str, T: int, batch: int, top: int = 12):
    """One forward+backward of ``name`` under torch.profiler (after a warm-up run): its ``top``
    operators by self CPU time and the share of every operator that is a matrix product."""
    from torch.profiler import ProfilerActivity, profile

    run = fwd_bwd_runner(layer(specs()[name]), T, batch)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    mat = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    rows = [[e.key, e.count, e.self_cpu_time_total / 1e3, 100.0 * e.self_cpu_time_total / total]
            for e in events[:top]]
    text = table(["operator", "calls", "self ms", "% of self time"], rows)
    return mat / total, total / 1e6, text


def state_bytes(state) -> int:
    total = 0
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(v) for v in state)
    if torch.is_tensor(state):
        total += state.numel() * state.element_size()
    return total


def step_latencies(module, prefixes: list[int], steps: int, batch: int = 1,
                   inplace: bool = False, block: int = 10):
    """Median per-token step time after each prefix of t tokens (built by the parallel form),
    and the state bytes there. The prefixes are timed in alternating blocks of ``block`` steps,
    so a slow spell of a shared machine falls on all of them alike. ``inplace``: the step
    writes into the state's own tensors (``step(..., inplace=True)``)."""
    import time

    with torch.no_grad():
        states = [module(torch.randn(batch, t, D))[1] for t in prefixes]
        x = torch.randn(batch, D)
        times = [[] for _ in prefixes]
        for i in range(len(prefixes)):  # warm-up: the first steps pay for allocations
            for _ in range(10):
                states[i] = module.step(x, states[i], inplace=inplace)[1]
        for _ in range(max(1, steps // block)):
            for i in range(len(prefixes)):
                for _ in range(block):
                    t0 = time.perf_counter()
                    states[i] = module.step(x, states[i], inplace=inplace)[1]
                    times[i].append(time.perf_counter() - t0)
    return ([statistics.median(t) for t in times], [state_bytes(s) for s in states])


def step_latency(module, t: int, steps: int, batch: int = 1, inplace: bool = False):
    """Median per-token step time after one prefix of t tokens, and the state bytes."""
    (latency,), (nbytes,) = step_latencies(module, [t], steps, batch, inplace)
    return latency, nbytes


def streaming_table(short: int, long: int, steps: int):
    rows = []
    for name in ("bmojo", "bmojo_f", "mamba"):
        mod = layer(specs()[name])
        row = [name]
        for inplace in (False, True):
            (t1, t2), (b1, b2) = step_latencies(mod, [short, long], steps, inplace=inplace)
            row += [t1 * 1e3, t2 * 1e3, t2 / t1]
        rows.append(row + [b1, b2])
    return table(["layer", f"step ms @t={short}", f"step ms @t={long}", "ratio",
                  f"in-place ms @t={short}", f"in-place ms @t={long}", "in-place ratio",
                  f"state bytes @{short}", f"state bytes @{long}"], rows)


def dense_leaky_average(k, log_decay):
    """The O(T^2) leaky average of the Memory Mosaics code: a dense decay matrix per head."""
    T = k.shape[1]
    i = torch.arange(T)
    lag = (i[:, None] - i[None, :]).clamp(min=0).to(k.dtype)
    coef = torch.exp(lag[None] * log_decay[:, None, None]) * (i[:, None] >= i[None, :])
    return torch.einsum("hts,bshe->bthe", coef, k)


def mosaic_table(T: int, batch: int, repeat: int):
    spec = memcore.spec.mosaic(D, H)
    from memcore import ops

    k = torch.randn(batch, T, H, D // H, requires_grad=True)
    log_decay = -torch.rand(H) * 5

    def ours():
        ops.leaky_average(k, log_decay).sum().backward()

    def dense():
        dense_leaky_average(k, log_decay).sum().backward()

    with torch.no_grad():
        err = (ops.leaky_average(k, log_decay) - dense_leaky_average(k, log_decay)).abs().max()
    t_ours = median_time(ours, repeat=repeat)
    t_dense = median_time(dense, repeat=repeat)
    mod = layer(spec)
    t_layer = fwd_bwd_time(mod, T, batch, repeat)
    return table(["T", "leaky avg (scan) ms", "dense O(T^2) ms", "speed-up", "max abs diff",
                  "mosaic layer fwd+bwd ms"],
                 [[T, t_ours * 1e3, t_dense * 1e3, t_dense / t_ours, float(err),
                   t_layer * 1e3]])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_cpu", description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--stream", type=int, nargs=2, default=[1024, 32768],
                   metavar=("SHORT", "LONG"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layers", nargs="+", default=["bmojo", "bmojo_f", "mamba", "mosaic"],
                   choices=["bmojo", "bmojo_f", "mamba", "mosaic"],
                   help="layers timed against attention (unbounded mosaic is O(T^2))")
    p.add_argument("--floor-length", type=int, default=8192,
                   help="T of the matmul-floor table")
    p.add_argument("--profile", nargs="*", default=["bmojo"],
                   choices=["bmojo", "bmojo_f", "mamba", "mosaic", "transformer(None)"],
                   help="layers profiled at the floor's T (section 5)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["training", "streaming", "mosaic", "floor", "profile"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"shapes: D={D}, H={H}, W={W}, chunk={CHUNK}, select={SELECT}, capacity={CAPACITY}, "
          f"d_state={N}, batch={args.batch}, float32, {torch.get_num_threads()} threads\n")
    if "training" not in args.skip:
        text, times = training_table(args.lengths, args.batch, args.repeat, args.layers)
        print("forward+backward, median seconds (ratio to full causal attention, SDPA):")
        print(text)
        if ("bmojo", 4096) in times and ("bmojo", 16384) in times:
            print(f"bmojo growth 4K -> 16K: "
                  f"{times[('bmojo', 16384)] / times[('bmojo', 4096)]:.2f}x (goal <= 4.5x)")
        if ("bmojo", 8192) in times:
            r = times[("bmojo", 8192)] / times[("transformer(None)", 8192)]
            print(f"bmojo / attention at T=8192: {r:.2f}x (goal <= 0.5x)")
        print()
    if "streaming" not in args.skip:
        print("streaming step latency (batch 1; functional step, then step(..., inplace=True)):")
        print(streaming_table(args.stream[0], args.stream[1], args.steps))
        print()
    if "floor" not in args.skip:
        rate, text = floor_table(args.floor_length, args.batch, args.repeat, args.layers)
        print(f"matmul floor at T={args.floor_length}: sgemm {rate / 1e9:.1f} GFLOP/s at "
              f"{torch.get_num_threads()} threads (best of {len(SGEMM_SHAPES)} shapes); goal: "
              f"bmojo within 1.4x of its floor")
        print(text)
        print()
    if "profile" not in args.skip:
        for name in args.profile:
            share, secs, text = profile_table(name, args.floor_length, args.batch)
            print(f"profile of {name} forward+backward at T={args.floor_length}: "
                  f"{secs:.2f} s of operator self time, {100 * share:.0f}% in matrix products")
            print(text)
            print()
    if "mosaic" not in args.skip:
        print("mosaic key extractor: scan vs dense O(T^2) leaky average, forward+backward:")
        print(mosaic_table(2048, args.batch, args.repeat))


if __name__ == "__main__":
    main()
