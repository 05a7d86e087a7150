"""Section 1 of the GPU benchmark: the selective scan against mamba-ssm's CUDA kernel and the
HBM floor (see ``benchmarks/gpu.py``)."""

from __future__ import annotations

import math

import torch

from .gpu_timing import bench, fwd_bwd, rel_err, skip, table


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
