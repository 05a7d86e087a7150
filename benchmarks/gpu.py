"""GPU benchmark of the Triton kernels, side by side with their baselines in one run.

1. selective scan (B=4, Dc=2048, T=4096, N=16; forward and forward+backward; bf16 and fp32)
   against mamba-ssm's CUDA ``selective_scan_fn``, with the bandwidth achieved against the HBM
   floor (every input read once, every output written once). Goals: >= 1.0x mamba-ssm's speed,
   >= 70% of the floor. Then the path the torch backend's dispatch picks for a scan
   (``MEMCORE_SCAN``, ``memcore.backends.torch.implementation.DEFAULT_SCAN``) and whether these
   timings say the default should be mamba-ssm's.
2. B'MOJO attention (raw window W plus fading window W) against attention over a sliding window
   of the same total span 2W: SDPA with an explicit band mask, flash_attn's ``window_size`` where
   flash_attn is installed, and SDPA's causal flash path over everything for scale.
   Goal: >= 0.8x the sliding-window baseline's speed.
3. a bmojo layer (torch backend) forward+backward against a full-attention layer (SDPA) at
   T = 8K and 32K, with peak memory. Goal: >= 1.1x faster at 8K.

Times are medians of ``triton.testing.do_bench`` after its warm-up. A row whose baseline is not
installed, or that fails (e.g. out of memory), prints the reason and is skipped; the rest run.
Each kernel's output is checked before it is timed (the relative RMSE is printed): the scan
against mamba-ssm (or the torch backend), the attention against a dense two-source softmax.
Run as ``python -m benchmarks gpu``; it needs a CUDA device and exits non-zero without one.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback

import torch

# peak HBM bandwidth by device name (GB/s), for the floor; --peak-gbps overrides
PEAK_GBPS = {"H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
             "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100": 1555,
             "L40S": 864, "A10G": 600, "L4": 300, "V100": 900}


def peak_gbps(name: str) -> float | None:
    for key in sorted(PEAK_GBPS, key=len, reverse=True):  # most specific name first
        if key.lower() in name.lower():
            return float(PEAK_GBPS[key])
    return None


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.pow(2).mean().sqrt()
    err = (got - want).pow(2).mean().sqrt()
    return float(err / scale) if scale > 0 else float(err)


def bench(fn) -> float:
    """Median milliseconds of fn() after warm-up."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def fwd_bwd(fn, inputs, out_grad=None):
    """A closure running fn() and its backward, gradients of ``inputs`` cleared each time."""
    def run():
        for t in inputs:
            t.grad = None
        y = fn()
        y.backward(out_grad if out_grad is not None else torch.ones_like(y))
    return run


def skip(row: str, why: str) -> None:
    print(f"  skipped {row}: {why}")


# ---------------------------------------------------------------- 1. selective scan

def scan_inputs(dtype, Bt, Dc, T, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dt)

    return dict(u=r(Bt, Dc, T), delta=r(Bt, Dc, T, scale=0.5),
                A=-torch.rand(Dc, N, generator=g, device="cuda") - 0.5,
                B=r(Bt, N, T), C=r(Bt, N, T), D=r(Dc, dt=torch.float32),
                delta_bias=r(Dc, dt=torch.float32, scale=0.1))


def scan_bytes(dtype, Bt, Dc, T, N, backward: bool) -> int:
    es = torch.tensor([], dtype=dtype).element_size()
    seq, bc = Bt * Dc * T, Bt * N * T
    small = 4 * (Dc * N + 2 * Dc)  # A, D, delta_bias in float32
    fwd = es * (2 * seq + 2 * bc + seq) + small  # read u, delta, B, C; write y
    if not backward:
        return fwd
    # backward: read u, delta, B, C, dy; write du, ddelta, dB, dC (and the small grads)
    return fwd + es * (3 * seq + 2 * bc + 2 * seq + 2 * bc) + 2 * small


def torch_path(inp, kw):
    """The torch backend's scan, the check's baseline where mamba-ssm is missing."""
    from memcore.backends.torch.selective_scan import selective_scan

    return lambda: selective_scan(**inp, **kw)


def scan_section(args, peak):
    from memcore.kernels.triton.selective_scan import selective_scan

    Bt, Dc, T, N = args.scan_shape
    print(f"\n1. selective scan, B={Bt} Dc={Dc} T={T} N={N}, delta_softplus, D and delta_bias "
          f"(milliseconds, medians)")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001 - any import failure means no baseline
        selective_scan_fn = None
        skip("mamba-ssm columns", f"mamba_ssm.selective_scan_fn not importable ({e!r})")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        inp = scan_inputs(dtype, Bt, Dc, T, N)
        grads = [t.requires_grad_() for t in inp.values()]
        kw = dict(delta_softplus=True)

        def ours(inp=inp, kw=kw):
            return selective_scan(**inp, **kw)

        theirs = None
        if selective_scan_fn is not None:
            def theirs(inp=inp):
                return selective_scan_fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                                         inp["D"], None, inp["delta_bias"], True)
        for mode in ("fwd", "fwd+bwd"):
            try:
                with torch.no_grad():
                    err = rel_err(ours(), (theirs or torch_path(inp, kw))())
                if mode == "fwd":
                    with torch.no_grad():
                        t_ours = bench(ours)
                        t_theirs = bench(theirs) if theirs is not None else float("nan")
                else:
                    dy = torch.randn(Bt, Dc, T, device="cuda").to(dtype)
                    t_ours = bench(fwd_bwd(ours, grads, dy))
                    t_theirs = (bench(fwd_bwd(theirs, grads, dy)) if theirs is not None
                                else float("nan"))
            except Exception as e:  # noqa: BLE001 - report and go on with the next row
                skip(f"scan {dtype} {mode}", repr(e))
                continue
            nbytes = scan_bytes(dtype, Bt, Dc, T, N, mode == "fwd+bwd")
            gbps = nbytes / (t_ours * 1e-3) / 1e9
            rows.append([str(dtype).replace("torch.", ""), mode, t_ours, t_theirs,
                         t_theirs / t_ours, err, nbytes / 1e6, gbps,
                         gbps / peak if peak else float("nan")])
    print(table(["dtype", "pass", "memcore ms", "mamba-ssm ms", "speed-up", "rel err",
                 "floor MB", "GB/s", "of peak"], rows))
    print("  rel err: memcore's output against mamba-ssm's (the torch backend's without it)")
    print("  goals: speed-up >= 1.0, of peak >= 0.70")
    print_scan_path(rows)


def print_scan_path(rows):
    """Which path the torch backend's dispatch takes for a scan on this device, and what the
    timings above say about memcore.backends.torch.implementation.DEFAULT_SCAN."""
    import os

    from memcore.backends.torch import implementation as api

    u = torch.zeros(1, 1, 1, device="cuda", dtype=torch.bfloat16)
    h0 = torch.ones(1, 1, 1, device="cuda")
    env = os.environ.get(api.SCAN_ENV) or "unset"
    try:
        picks = (f"without an initial state: {api.scan_path(u)}; with one: "
                 f"{api.scan_path(u, h0)}")
    except (ImportError, ValueError) as e:
        picks = f"none ({e})"
    print(f"  dispatch ({api.SCAN_ENV}={env}, DEFAULT_SCAN={api.DEFAULT_SCAN!r}) picks, for a "
          f"scan {picks}")
    # speed-up < 1 means mamba-ssm's is faster; fwd+bwd is what training runs
    slower = [f"{r[0]} {r[1]}" for r in rows if r[1] == "fwd+bwd" and r[4] < 1.0]
    timed = [r for r in rows if r[1] == "fwd+bwd" and not math.isnan(r[4])]
    if not timed:
        print("  no mamba-ssm timing: DEFAULT_SCAN stays 'triton'")
    elif slower:
        print(f"  mamba-ssm is faster in {', '.join(slower)}: DEFAULT_SCAN = 'mamba_ssm' would "
              f"serve calls without an initial state faster")
    else:
        print("  the Triton kernel is at least as fast in every fwd+bwd row: DEFAULT_SCAN = "
              "'triton' is right")


# ---------------------------------------------------------------- 2. attention

def band_mask(T, span, device):
    i = torch.arange(T, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - span)


def attention_section(args):
    from memcore.kernels.triton.windowed_readout import windowed_readout

    Bt, T, H, E = args.attn_shape
    W = args.window
    dtype = torch.bfloat16
    print(f"\n2. B'MOJO attention (raw W={W} + fading W={W}) vs a sliding window of span 2W="
          f"{2 * W}; B={Bt} T={T} H={H} E={E} bf16 (milliseconds, medians)")
    g = torch.Generator(device="cuda").manual_seed(1)
    bthe = [torch.randn(Bt, T, H, E, generator=g, device="cuda").to(dtype).requires_grad_()
            for _ in range(5)]
    q, k, v, fk, fv = bthe
    # the baselines' layout [B, H, T, E], made once so no transpose is timed
    bhte = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    Q, K, V = bhte
    F = torch.nn.functional
    mask = band_mask(T, 2 * W, "cuda")
    C, M = args.chunk, args.capacity
    S = triton_cdiv(T, C)
    sk = torch.randn(Bt, H, S, M, E, generator=g, device="cuda").to(dtype).requires_grad_()
    sv = torch.randn(Bt, H, S, M, E, generator=g, device="cuda").to(dtype).requires_grad_()
    # snapshot s holds M positions from before its chunk (empty for the first)
    spos = (torch.arange(S, device="cuda")[:, None] * C - 1 - torch.arange(M, device="cuda")
            * max(C // M, 1))[None].expand(Bt, S, M).contiguous()
    spos = torch.where(spos >= 0, spos, -1)

    cands = {
        "memcore raw+fading": (lambda: windowed_readout(q, k, v, W, fk, fv), bthe),
        f"memcore raw+fading+store (C={C}, M={M})": (
            lambda: windowed_readout(q, k, v, W, fk, fv, sk, sv, spos, C), bthe + [sk, sv]),
        "SDPA, band mask 2W": (
            lambda: F.scaled_dot_product_attention(Q, K, V, attn_mask=mask), bhte),
        "SDPA causal (flash), full T": (
            lambda: F.scaled_dot_product_attention(Q, K, V, is_causal=True), bhte),
    }
    try:
        from flash_attn import flash_attn_func

        cands[f"flash_attn window ({2 * W - 1}, 0)"] = (
            lambda: flash_attn_func(q, k, v, causal=True, window_size=(2 * W - 1, 0)), bthe[:3])
    except Exception as e:  # noqa: BLE001 - any import failure means no such baseline
        skip("flash_attn row", f"flash_attn not importable ({e!r})")
    # correctness gate: the last rows against a dense two-source softmax
    with torch.no_grad():
        tail = slice(max(T - 256, 0), T)
        err = rel_err(windowed_readout(q, k, v, W, fk, fv)[:, tail],
                      _two_source_reference(q, k, v, fk, fv, W, tail))
    print(f"  check: memcore vs a dense two-source softmax on the last rows, rel err {err:.2e}")
    rows, base = [], {}
    for name, (fn, inputs) in cands.items():
        try:
            with torch.no_grad():
                t_f = bench(fn)
            t_fb = bench(fwd_bwd(fn, inputs))
        except Exception as e:  # noqa: BLE001 - report and go on with the next row
            skip(name, repr(e))
            continue
        base[name] = (t_f, t_fb)
        rows.append([name, t_f, t_fb])
    ref = next((n for n in base if n.startswith("flash_attn")), "SDPA, band mask 2W")
    if ref in base and "memcore raw+fading" in base:
        for row in rows:
            row += [base[ref][0] / row[1], base[ref][1] / row[2]]
        print(table(["kernel", "fwd ms", "fwd+bwd ms", f"fwd speed vs {ref}",
                     "fwd+bwd speed vs it"], rows))
    else:
        print(table(["kernel", "fwd ms", "fwd+bwd ms"], rows))
    print("  goal: memcore raw+fading >= 0.8x the sliding-window baseline")


def triton_cdiv(a, b):
    return -(-a // b)


def _two_source_reference(q, k, v, fk, fv, W, rows):
    """Dense float32 softmax over raw keys (t-W, t] and fading keys (t-2W, t-W] for some rows."""
    T, E = q.shape[1], q.shape[3]
    i = torch.arange(T, device=q.device)[rows]
    j = torch.arange(T, device=q.device)
    raw = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - W)
    fad = (j[None, :] <= i[:, None] - W) & (j[None, :] > i[:, None] - 2 * W)
    qf = q[:, rows].float().transpose(1, 2)
    s_raw = qf @ k.float().transpose(1, 2).transpose(-1, -2) / math.sqrt(E)
    s_fad = qf @ fk.float().transpose(1, 2).transpose(-1, -2) / math.sqrt(E)
    s = torch.cat([s_raw.masked_fill(~raw, float("-inf")),
                   s_fad.masked_fill(~fad, float("-inf"))], -1)
    p = torch.softmax(s, -1)
    vals = torch.cat([v.float().transpose(1, 2), fv.float().transpose(1, 2)], 2)
    return (p @ vals).transpose(1, 2)


# ---------------------------------------------------------------- 3. layers

def layer_section(args):
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
    rows = []
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
                skip(f"{name} at T={T}", repr(e).splitlines()[0][:300])
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


# ---------------------------------------------------------------- main

def table(header, rows):
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=["scan", "attention", "layer"],
                   default=["scan", "attention", "layer"])
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="HBM peak in GB/s (default: from the device name)")
    p.add_argument("--scan-shape", type=int, nargs=4, default=[4, 2048, 4096, 16],
                   metavar=("B", "Dc", "T", "N"))
    p.add_argument("--attn-shape", type=int, nargs=4, default=[2, 8192, 16, 64],
                   metavar=("B", "T", "H", "E"))
    p.add_argument("--window", type=int, default=512, help="W (the span compared is 2W)")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--select", type=int, default=8)
    p.add_argument("--capacity", type=int, default=64)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--layer-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu: needs a CUDA device, and torch.cuda.is_available() is False "
                 "on this machine; nothing was measured (the CPU benchmarks are "
                 "`python -m benchmarks torch_cpu`)")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        sys.exit(f"benchmarks.gpu: needs triton for the kernels ({e}); "
                 f"pip install 'memcore[triton]'")
    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or peak_gbps(name)
    print(f"device: {name} (torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"triton {triton.__version__})")
    print(f"HBM peak for the floor: {peak:.0f} GB/s" if peak else
          "HBM peak unknown for this device: pass --peak-gbps for the bandwidth columns")
    sections = {"scan": lambda: scan_section(args, peak),
                "attention": lambda: attention_section(args),
                "layer": lambda: layer_section(args)}
    failed = []
    for key in args.only:
        try:
            sections[key]()
        except Exception:  # noqa: BLE001 - one broken section must not hide the others
            print(f"\nsection {key} failed:")
            traceback.print_exc()
            failed.append(key)
        torch.cuda.empty_cache()
    if failed:
        sys.exit(f"benchmarks.gpu: sections failed: {failed}")


if __name__ == "__main__":
    main(sys.argv[1:])
