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
    """MQAR accuracy (test, mean +- std over seeds) against the memory footprint at the
    evaluation length (state + store + KV cache bytes, log scale): one point per model of a
    table, or, for a sweep (``results["points"]``), one curve per family and one panel per
    (L, kv). Returns the path or None."""
    plt = _pyplot()
    if plt is None:
        return None
    points = results.get("points")
    if points is None:  # one table: a point per model
        panels = {None: {name: [r] for name, r in results["models"].items()}}
    else:
        panels = {}
        for p in points:
            panels.setdefault(p["grid"], {}).setdefault(p["family"], []).append(p)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    cfg = results.get("config", {})
    for ax, (grid, families) in zip(axes[0], panels.items(), strict=True):
        for family, pts in families.items():
            pts = sorted(pts, key=lambda r: r["memory_bytes"])
            xs = [r["memory_bytes"] for r in pts]
            ys = [r["accuracy"] for r in pts]
            err = [r.get("accuracy_std", 0.0) for r in pts]
            ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, label=family,
                        ls="-" if len(pts) > 1 else "none")
            if points is None:
                ax.annotate(family, (xs[0], ys[0]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("memory at evaluation length (bytes: state + store + KV cache)")
        ax.set_ylabel("MQAR test accuracy")
        title = grid if grid is not None else (
            f"L={cfg['seq_len']}, kv={cfg['num_kv_pairs']}" if "seq_len" in cfg else "")
        if "vocab_size" in cfg:
            title += f", V={cfg['vocab_size']}, d={cfg['d_model']}"
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if points is not None:
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def loss_by_position(results: dict, path: str, bucket: int = 8) -> str | None:
    """Held-out next-byte loss against position (averaged over buckets of positions), one
    line per model and baseline, the training length marked."""
    lines = []
    for name, r in {**results["models"], **results.get("baselines", {})}.items():
        per = r["loss_by_position"]
        n = len(per) // bucket
        lines.append((name, [bucket * i + bucket / 2 for i in range(n)],
                      [sum(per[bucket * i:bucket * (i + 1)]) / bucket for i in range(n)]))
    marks = [dict(x=results["config"]["seq_len"], color="k", ls="--", lw=0.8,
                  label="training length")]
    return _line_panels(path, [(None, lines, marks)], "position", "held-out loss (nats/byte)",
                        (6, 4))


def moons_error(results: dict, path: str) -> str | None:
    """25-step prediction error against context length, 1 head vs 3 heads (in both alignments
    where the results hold both), one panel per period set, with its single periods (dotted)
    and LCM (dashed) marked."""
    panels = []
    for key, marks in results["marks"].items():
        lines = [(f"{name} ({a})", results["contexts"], r[field][key])
                 for a, field in (("paper", "error"), ("official plot", "error_official_plot"))
                 for name, r in results["models"].items() if field in r]
        panels.append((f"periods {key}", lines,
                       [dict(x=p, color="gray", ls=":", lw=0.8) for p in marks["periods"]] +
                       [dict(x=marks["lcm"], color="k", ls="--", lw=0.8, label="LCM")]))
    return _line_panels(path, panels, "context length (steps)", "25-step mean |error|",
                        (5 * len(panels), 3.6))


def moons_weights(results: dict, path: str) -> str | None:
    """The learned 3x3 maps (|W| of W_phi, W_psi and W_out, one row per model): with 3 heads
    each head's key and value maps should pick one moon (predictive disentanglement)."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(results["models"])
    maps = ("phi", "psi", "out")
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 2.8 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for ax, m in zip(row, maps, strict=True):
            im = ax.imshow(results["models"][name]["weights"][m], cmap="viridis")
            fig.colorbar(im, ax=ax)
            ax.set_title(f"{name}: |W_{m}|", fontsize=9)
            ax.set_xticks(range(3))
            ax.set_yticks(range(3))
            ax.set_xlabel("input moon", fontsize=8)
            ax.set_ylabel("output dim", fontsize=8)
    return _save(plt, fig, path)


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
    """Accuracy and TVD per model (mean +- std over seeds) and baseline, side by side."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = {**results["models"], **results.get("baselines", {})}
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key in zip(axes, ("accuracy", "tvd"), strict=True):
        ax.bar(names, [rows[n][key] for n in names],
               yerr=[rows[n].get(f"{key}_std", 0.0) for n in names], capsize=3)
        ax.set_ylabel(key if key == "accuracy" else "TVD (sum |p - q|)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"RegBench, {results['config']['train_dfas']} training automata")
    return _save(plt, fig, path)
