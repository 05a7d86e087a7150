"""Section 3 of the GPU benchmark: a bmojo layer against a full-attention layer, forward and
backward, with peak memory (see ``benchmarks/gpu.py``)."""

from __future__ import annotations

import torch

from .gpu_timing import bench, skip, table


def layer_section(args):
    """Prints the table; returns the figures: one row per sequence length."""
    import memcore

    S = memcore.spec
    D, H, W = args.d_model, args.heads, args.window
    dtype = getattr(torch, args.layer_dtype)
    specs = {
        "full attention (transformer, SDPA)": S.transformer(D, H),
        "bmojo": S.bmojo(D, H, window=W, chunk=args.chunk, select=args.select,
                         capacity=args.capacity, d_state=16),
    }
    print(f"\n3. layer forward+backward, torch backend on CUDA, D={D} H={H} W={W} "
          f"chunk={args.chunk} select={args.select} capacity={args.capacity} "
          f"batch={args.batch} {args.layer_dtype} (milliseconds, medians; peak GiB)")
    rows, skipped = [], []
    for T in args.lengths:
        res = {}
        for name, spec in specs.items():
            try:
                mod = memcore.realize(spec, backend="torch", params=memcore.init(spec, 0),
                                      device="cuda", dtype=dtype)
                x = torch.randn(args.batch, T, D, device="cuda").to(dtype).requires_grad_()

                def run(mod=mod, x=x):
                    mod.zero_grad(set_to_none=True)
                    x.grad = None
                    y, _ = mod(x)
                    y.float().pow(2).mean().backward()

                run()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                run()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
                res[name] = (bench(run), peak)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report, go on
                skip(f"{name} at T={T}", repr(e).splitlines()[0][:300], skipped)
            finally:
                mod = x = None
                torch.cuda.empty_cache()
        full = res.get("full attention (transformer, SDPA)")
        bm = res.get("bmojo")
        rows.append([T, full[0] if full else float("nan"), bm[0] if bm else float("nan"),
                     full[0] / bm[0] if full and bm else float("nan"),
                     full[1] if full else float("nan"), bm[1] if bm else float("nan")])
    print(table(["T", "full attn ms", "bmojo ms", "bmojo speed-up", "full attn peak GiB",
                 "bmojo peak GiB"], rows))
    print("  goal: bmojo speed-up >= 1.1 at T=8192")
    keys = ["T", "full_attention_ms", "bmojo_ms", "bmojo_speedup", "full_attention_peak_gib",
            "bmojo_peak_gib"]
    return dict(shape=dict(D=D, H=H, W=W, chunk=args.chunk, select=args.select,
                           capacity=args.capacity, batch=args.batch), dtype=args.layer_dtype,
                rows=[dict(zip(keys, row, strict=True)) for row in rows], skipped=skipped)
