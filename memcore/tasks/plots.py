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


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    return _save(plt, fig, path)


def loss_by_position(results: dict, path: str, bucket: int = 8) -> str | None:
    """Held-out next-byte loss against position (averaged over buckets of positions), one
    line per model, the training length marked."""
    lines = []
    for name, r in results["models"].items():
        per = r["loss_by_position"]
        n = len(per) // bucket
        lines.append((name, [bucket * i + bucket / 2 for i in range(n)],
                      [sum(per[bucket * i:bucket * (i + 1)]) / bucket for i in range(n)]))
    marks = [dict(x=results["config"]["seq_len"], color="k", ls="--", lw=0.8,
                  label="training length")]
    return _line_panels(path, [(None, lines, marks)], "position", "held-out loss (nats/byte)",
                        (6, 4))


def moons_error(results: dict, path: str) -> str | None:
    """25-step prediction error against context length, 1 head vs 3 heads, one panel per
    period set, with its single periods (dotted) and LCM (dashed) marked."""
    panels = []
    for key, marks in results["marks"].items():
        lines = [(name, results["contexts"], r["error"][key])
                 for name, r in results["models"].items()]
        panels.append((f"periods {key}", lines,
                       [dict(x=p, color="gray", ls=":", lw=0.8) for p in marks["periods"]] +
                       [dict(x=marks["lcm"], color="k", ls="--", lw=0.8, label="LCM")]))
    return _line_panels(path, panels, "context length (steps)", "25-step mean |error|",
                        (5 * len(panels), 3.6))


def _line_panels(path: str, panels: list, xlabel: str, ylabel: str, figsize) -> str | None:
    """Line plots side by side, one panel per (title or None, [(label, xs, ys)], [axvline
    keywords]), each with a grid and a legend. Returns the path or None."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, (title, lines, marks) in zip(axes[0], panels, strict=True):
        for label, xs, ys in lines:
            ax.plot(xs, ys, label=label)
        for mark in marks:
            ax.axvline(**mark)
        if title is not None:
            ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)
