"""Section 1 of the GPU benchmark: the selective scan against mamba-ssm's CUDA kernel (the torch
backend's own scan where mamba-ssm is missing) and the HBM floor (see ``benchmarks/gpu.py``)."""

from __future__ import annotations

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
    """The torch backend's own scan, the baseline where mamba-ssm is missing. Asked for by name:
    ``auto`` would take the Triton kernel on CUDA tensors and time the kernel against itself."""
    from memcore.backends.torch.selective_scan import selective_scan

    return lambda: selective_scan(**inp, **kw, implementation="torch")


def scan_section(args, peak):
    """Prints the table; returns the figures: one row per dtype and pass, with the baseline
    ("mamba_ssm", else "torch") named."""
    from memcore.kernels.triton.selective_scan import selective_scan

    Bt, Dc, T, N = args.scan_shape
    print(f"\n1. selective scan, B={Bt} Dc={Dc} T={T} N={N}, delta_softplus, D and delta_bias "
          f"(milliseconds, medians)")
    skipped = []
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001 - any import failure means no such baseline
        selective_scan_fn = None
        skip("mamba-ssm columns", f"mamba_ssm.selective_scan_fn not importable ({e!r}); the "
             f"baseline is the torch backend's own scan", skipped)
    baseline = "mamba_ssm" if selective_scan_fn is not None else "torch"
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        inp = scan_inputs(dtype, Bt, Dc, T, N)
        grads = [t.requires_grad_() for t in inp.values()]
        kw = dict(delta_softplus=True)

        def ours(inp=inp, kw=kw):
            return selective_scan(**inp, **kw)

        if selective_scan_fn is not None:
            def theirs(inp=inp):
                return selective_scan_fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                                         inp["D"], None, inp["delta_bias"], True)
        else:
            theirs = torch_path(inp, kw)
        name = str(dtype).replace("torch.", "")
        for mode in ("fwd", "fwd+bwd"):
            try:
                with torch.no_grad():
                    err = rel_err(ours(), theirs())
                if mode == "fwd":
                    with torch.no_grad():
                        t_ours, t_theirs = bench(ours), bench(theirs)
                else:
                    dy = torch.randn(Bt, Dc, T, device="cuda").to(dtype)
                    t_ours = bench(fwd_bwd(ours, grads, dy))
                    t_theirs = bench(fwd_bwd(theirs, grads, dy))
            except Exception as e:  # noqa: BLE001 - report and go on with the next row
                skip(f"scan {name} {mode}", repr(e), skipped)
                continue
            nbytes = scan_bytes(dtype, Bt, Dc, T, N, mode == "fwd+bwd")
            gbps = nbytes / (t_ours * 1e-3) / 1e9
            rows.append({"dtype": name, "pass": mode, "memcore_ms": t_ours,
                         "baseline_ms": t_theirs, "speedup": t_theirs / t_ours, "rel_err": err,
                         "floor_mb": nbytes / 1e6, "gbps": gbps,
                         "of_peak": gbps / peak if peak else float("nan")})
    print(table(["dtype", "pass", "memcore ms", f"{baseline} ms", "speed-up", "rel err",
                 "floor MB", "GB/s", "of peak"], [list(r.values()) for r in rows]))
    print(f"  rel err and speed-up: memcore's Triton kernel against {baseline}'s scan")
    print("  goals: speed-up >= 1.0 against mamba-ssm, of peak >= 0.70")
    return dict(shape=dict(B=Bt, Dc=Dc, T=T, N=N), peak_gbps=peak, baseline=baseline,
                rows=rows, skipped=skipped, dispatch=scan_path_report(rows, baseline))


def scan_path_report(rows, baseline):
    """Which path the torch backend's dispatch takes for a scan on this device, and what the
    timings above say about memcore.backends.torch.implementation.DEFAULT_SCAN (printed and
    returned)."""
    import os

    from memcore.backends.torch import implementation as api

    u = torch.zeros(1, 1, 1, device="cuda", dtype=torch.bfloat16)
    h0 = torch.ones(1, 1, 1, device="cuda")
    env = os.environ.get(api.SCAN_ENV) or "unset"
    try:
        picks = {"no_initial_state": api.scan_path(u), "initial_state": api.scan_path(u, h0)}
        said = (f"without an initial state: {picks['no_initial_state']}; with one: "
                f"{picks['initial_state']}")
    except (ImportError, ValueError) as e:
        picks, said = {"error": str(e)}, f"none ({e})"
    print(f"  dispatch ({api.SCAN_ENV}={env}, DEFAULT_SCAN={api.DEFAULT_SCAN!r}) picks, for a "
          f"scan {said}")
    # speed-up < 1 means mamba-ssm's is faster; fwd+bwd is what training runs
    timed = [r for r in rows if r["pass"] == "fwd+bwd"] if baseline == "mamba_ssm" else []
    slower = [f"{r['dtype']} {r['pass']}" for r in timed if r["speedup"] < 1.0]
    if not timed:
        verdict = "no mamba-ssm timing: DEFAULT_SCAN stays 'triton'"
    elif slower:
        verdict = (f"mamba-ssm is faster in {', '.join(slower)}: DEFAULT_SCAN = 'mamba_ssm' "
                   f"would serve calls without an initial state faster")
    else:
        verdict = ("the Triton kernel is at least as fast in every fwd+bwd row: DEFAULT_SCAN "
                   "= 'triton' is right")
    print(f"  {verdict}")
    return dict(env=env, default_scan=api.DEFAULT_SCAN, picks=picks, verdict=verdict)
