"""What the GPU benchmark's sections share: timing, error, the HBM peak by device, tables."""

from __future__ import annotations

import math

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


def skip(row: str, why: str, skipped: list | None = None) -> None:
    """Print why ``row`` is not measured, and add it to ``skipped`` (the section's JSON)."""
    print(f"  skipped {row}: {why}")
    if skipped is not None:
        skipped.append({"row": row, "why": why})


def table(header, rows):
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
