"""Plots for the tasks. matplotlib is optional (the ``tasks`` extra): it is imported only when
a plot is drawn, and a missing matplotlib skips the plot with a message instead of failing."""

from __future__ import annotations

import sys


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'memcore[tasks]'): no plot written",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def accuracy_vs_memory(results: dict, path: str) -> str | None:
    """MQAR accuracy against the memory footprint at the evaluation length (state + store +
    KV cache bytes), one point per model, log-scaled footprint. Returns the path or None."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["models"].items():
        ax.scatter(r["state_bytes"], r["accuracy"], s=40)
        ax.annotate(name, (r["state_bytes"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("memory footprint at evaluation length (bytes: state + store + KV cache)")
    ax.set_ylabel("MQAR accuracy")
    cfg = results.get("config", {})
    if "seq_len" in cfg:
        ax.set_title(f"MQAR, L={cfg['seq_len']}, kv={cfg['num_kv_pairs']}, "
                     f"V={cfg['vocab_size']}, d={cfg['d_model']}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_by_position(results: dict, path: str, bucket: int = 8) -> str | None:
    """Held-out next-byte loss against position (averaged over buckets of positions), one
    line per model, the training length marked."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["models"].items():
        per = r["loss_by_position"]
        n = len(per) // bucket
        xs = [bucket * i + bucket / 2 for i in range(n)]
        ys = [sum(per[bucket * i:bucket * (i + 1)]) / bucket for i in range(n)]
        ax.plot(xs, ys, label=name)
    L = results["config"]["seq_len"]
    ax.axvline(L, color="k", ls="--", lw=0.8, label="training length")
    ax.set_xlabel("position")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def moons_error(results: dict, path: str) -> str | None:
    """25-step prediction error against context length, 1 head vs 3 heads, one panel per
    period set, with its single periods (dotted) and LCM (dashed) marked."""
    plt = _pyplot()
    if plt is None:
        return None
    sets = list(results["marks"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, key in zip(axes[0], sets, strict=True):
        for name, r in results["models"].items():
            ax.plot(results["contexts"], r["error"][key], label=name)
        marks = results["marks"][key]
        for p in marks["periods"]:
            ax.axvline(p, color="gray", ls=":", lw=0.8)
        ax.axvline(marks["lcm"], color="k", ls="--", lw=0.8, label="LCM")
        ax.set_title(f"periods {key}")
        ax.set_xlabel("context length (steps)")
        ax.set_ylabel("25-step mean |error|")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def regbench_bars(results: dict, path: str) -> str | None:
    """Accuracy and TVD per model, side by side."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(results["models"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key in zip(axes, ("accuracy", "tvd"), strict=True):
        ax.bar(names, [results["models"][n][key] for n in names])
        ax.set_ylabel(key if key == "accuracy" else "TVD (sum |p - q|)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"RegBench, {results['config']['train_dfas']} training automata")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
