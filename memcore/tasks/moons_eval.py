"""The evaluation of three-moons models (``memcore.tasks.moons``): rollouts from a model's
streaming state after every context length, the two alignments of the 25-step error, and each
model's line of the results from its runs."""

from __future__ import annotations

import numpy as np
import torch

from memcore.tasks import protocol, runs


@torch.no_grad()
def rollout(model, seqs, contexts, horizon: int = 25, official_cache: bool = False):
    """For each context length c: the model's predictions x^_c .. x^_{c+horizon} ([B, horizon
    + 1, 6]) after the true x_0 .. x_{c-1}, generating from its own outputs.

    The streaming state is the memory of (key, value) pairs: the pair of position j gets its
    value W_psi x_{j+1} when x_{j+1} (true or generated) comes in, as ``forward`` does over the
    whole sequence, and each step adds one key and reads the pairs before it. ``official_cache``
    replays the official cached ``generate`` instead, where the value of the last context
    position and of every generated position stays zero (its padding)."""
    x = torch.as_tensor(np.asarray(seqs, dtype=np.float32))
    B, T, _ = x.shape
    keys = model.key(x).permute(0, 2, 3, 1)  # [B, H, E, T]: positions last, read as rows
    vals = model.value(x[:, 1:]).permute(0, 2, 3, 1)  # [..., j]: the value of the pair j
    first = model(x)  # first[:, c - 1] = x^_c: the context's own prediction
    for c in contexts:
        if not 1 <= c <= T:
            raise ValueError(f"rollout: context lengths must lie in [1, {T}], got {c}")
        kb = torch.cat([keys[..., :c], keys.new_zeros(*keys.shape[:3], horizon)], -1)
        vb = torch.cat([vals[..., :c - 1], vals.new_zeros(*vals.shape[:3], horizon + 1)], -1)
        gen = [first[:, c - 1]]
        for i in range(horizon):
            z = gen[-1]  # x^_{c+i}: completes the pair c - 1 + i, then queries as c + i
            if not official_cache:
                vb[..., c - 1 + i] = model.value(z)
            q = model.key(z)  # [B, H, E]
            kb[..., c + i] = q
            w = torch.softmax((q[..., None] * kb[..., :c + i]).sum(-2), -1)  # [B, H, c + i]
            y = (w[:, :, None] * vb[..., :c + i]).sum(-1)
            gen.append(model.out(y.reshape(B, 6)))
        yield c, torch.stack(gen, 1).numpy()


def horizon_errors(gen: np.ndarray, seqs: np.ndarray, c: int, horizon: int) -> dict:
    """The 25-step mean |error| at context c from ``gen`` = x^_c .. x^_{c+horizon} [B, horizon
    + 1, F]: ``paper`` compares x^_{c+i} with x_{c+i}, ``official_plot`` x^_{c+1+i} with
    x_{c+i} (i < horizon)."""
    truth = np.asarray(seqs)[:, c:c + horizon]
    if truth.shape[1] != horizon or gen.shape[1] != horizon + 1:
        raise ValueError(f"horizon_errors: need x up to c + {horizon - 1} = {c + horizon - 1} "
                         f"and {horizon + 1} generated steps")
    return {"paper": float(np.abs(gen[:, :horizon] - truth).mean()),
            "official_plot": float(np.abs(gen[:, 1:] - truth).mean())}


ALIGNMENTS = ("paper", "official_plot")


def rollout_errors(model, seqs, contexts, horizon: int = 25,
                   official_cache: bool = False) -> dict:
    """{alignment: [error at each context]} (``horizon_errors``) from ``rollout`` of a torch
    ``moons_model.MoonsMemory``."""
    out = {a: [] for a in ALIGNMENTS}
    for c, gen in rollout(model, seqs, contexts, horizon, official_cache):
        for a, e in horizon_errors(gen, seqs, c, horizon).items():
            out[a].append(e)
    return {a: np.array(v) for a, v in out.items()}


def rollout_error_jax(model, seqs: np.ndarray, contexts, horizon: int = 25,
                      bucket: int = 128) -> np.ndarray:
    """``moons.rollout_error`` recomputed on the JAX twin, a full forward per generated step
    (a check of the cached rollout). Each context runs on a buffer of c + horizon steps rounded
    up to ``bucket`` (causal, so the tail does not matter), which keeps the compiled shapes
    few."""
    import jax.numpy as jnp

    from memcore.tasks.jax_stack import extend_sequence

    errs = []
    for c in contexts:
        n = min(seqs.shape[1], -(-(c + horizon) // bucket) * bucket)
        buf = jnp.asarray(seqs[:, :n])
        gen = []
        for i in range(horizon):
            buf, y = extend_sequence(model, buf, jnp.asarray(c - 1 + i, jnp.int32))
            gen.append(np.asarray(y))
        g = np.stack(gen, 1)
        errs.append(float(np.abs(g - seqs[:, c:c + horizon]).mean()))
    return np.array(errs)


def summarize(results: list) -> dict:
    """One model's line: the protocol's choice over its runs (the lowest mean validation
    error), the curves at that rate (mean and std over seeds) and the first seed's weights."""
    sel = protocol.select(results, metric="held_out_error", val="val_error", maximize=False)
    at = [r for r in results if r["lr"] == sel["lr"]]
    line = {**sel, "final_loss": float(np.mean([r["final_loss"] for r in at])),
            "params": at[0]["params"], "seconds": round(sum(r["seconds"] for r in results), 1),
            "weights": at[0]["weights"]}
    for a in ALIGNMENTS:
        key = "error" if a == "paper" else f"error_{a}"
        stacked = {k: np.array([r["curves"][a][k] for r in at]) for k in at[0]["curves"][a]}
        line[key] = {k: v.mean(0).round(5).tolist() for k, v in stacked.items()}
        line[key + "_sd"] = {k: (v.std(0, ddof=1) if len(v) > 1 else 0 * v[0]).round(5).tolist()
                             for k, v in stacked.items()}
    line["runs"] = [{k: v for k, v in r.items() if k not in ("curves", "weights")}
                    for r in results]
    return line


def table(results: dict) -> str:
    """The paper alignment's error at a few context lengths, per model and set."""
    contexts = results["contexts"]
    picks = sorted({0, len(contexts) // 4, len(contexts) // 2, len(contexts) - 1})
    head = f"{'model':<8} {'set':<22} " + " ".join(f"c={contexts[i]:<5}" for i in picks) + \
        f" {'mean':>6} {'lr':>8}"
    return runs.table(head, len(head),
                      (f"{name:<8} {k:<22} " + " ".join(f"{e[i]:<7.3f}" for i in picks) +
                       f" {np.mean(e):>6.3f} {r['lr']:>8.1e}"
                       for name, r in results["models"].items() for k, e in r["error"].items()))
