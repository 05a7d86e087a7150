"""GPU benchmark of the Triton kernels, side by side with their baselines in one run.

1. selective scan (B=4, Dc=2048, T=4096, N=16; forward and forward+backward; bf16 and fp32)
   against mamba-ssm's CUDA ``selective_scan_fn`` (where mamba-ssm is missing: the torch
   backend's own scan, named in the output), with the bandwidth achieved against the HBM
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
Run as ``python -m benchmarks gpu``; it needs a CUDA device and exits non-zero
without one. ``--json PATH`` writes every figure (timings, bandwidths, ratios, errors, the rows
skipped and why) to PATH as well; without a CUDA device it still writes PATH, each section
"skipped: no CUDA device".
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from .gpu_layers import layer_section
from .gpu_selective_scan import scan_section
from .gpu_timing import peak_gbps
from .gpu_windowed_readout import attention_section
from .harness import write_json

SECTIONS = ("scan", "attention", "layer")
NO_CUDA = "skipped: no CUDA device"


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write every figure to PATH (rewritten after each section, so a "
                        "run cut short keeps the sections it finished)")
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
    report = {"benchmark": "gpu", "argv": list(argv or []), "status": "running",
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "sections": {key: {"status": "pending"} for key in args.only}}

    def save(**changes):
        report.update(changes)
        if args.json:
            write_json(args.json, report)

    if not torch.cuda.is_available():
        save(status=NO_CUDA, sections={key: {"status": NO_CUDA} for key in args.only})
        sys.exit("benchmarks.gpu: needs a CUDA device, and torch.cuda.is_available() is False "
                 "on this machine; nothing was measured (the CPU benchmarks are "
                 "`python -m benchmarks torch_cpu`)")
    try:
        import triton
    except ImportError as e:
        save(status=f"failed: triton does not import ({e})")
        sys.exit(f"benchmarks.gpu: needs triton for the kernels ({e}); "
                 f"pip install 'memcore[triton]'")
    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or peak_gbps(name)
    print(f"device: {name} (torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"triton {triton.__version__})")
    print(f"HBM peak for the floor: {peak:.0f} GB/s" if peak else
          "HBM peak unknown for this device: pass --peak-gbps for the bandwidth columns")
    save(device=name, triton=triton.__version__, peak_gbps=peak)
    sections = {"scan": lambda: scan_section(args, peak),
                "attention": lambda: attention_section(args),
                "layer": lambda: layer_section(args)}
    failed = []
    for key in args.only:
        report["sections"][key] = {"status": "running"}
        save()
        t0 = time.perf_counter()
        try:
            figures = {"status": "ok", **sections[key]()}
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            print(f"\nsection {key} failed:")
            traceback.print_exc()
            failed.append(key)
            figures = {"status": f"failed: {e!r}"[:500],
                       "traceback": traceback.format_exc()[-3000:]}
        figures["seconds"] = time.perf_counter() - t0
        report["sections"][key] = figures
        save()
        torch.cuda.empty_cache()
    save(status=f"failed: sections {failed}" if failed else "ok")
    if failed:
        sys.exit(f"benchmarks.gpu: sections failed: {failed}")


if __name__ == "__main__":
    main(sys.argv[1:])
