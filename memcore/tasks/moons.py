"""Memory Mosaics' three-moons experiment (predictive disentanglement), on the official protocol
(facebookresearch/MemoryMosaics, ``ThreeMoons/``).

Data (``planets.py``): three moons turn with periods p1 < p2 < p3 from {0.5, 1, ..., 3.5}; each
contributes the unit complex number exp(i (2 pi t / p + 0.3)), so x_t lies in C^3 (R^6 as (re,
im) pairs; the official code stores (sin, cos), the complex conjugate up to a factor i, which a
complex-linear model absorbs exactly), sampled at t = n / (800 / 18) from a random start below
10^4 - 2 * 800 - 1. The 35 period sets are ordered by least common multiple with numpy's argsort;
the first 9 are kept, the last of them ({1, 2, 3}) is held out and the other 8 train. Ties of the
argsort (four sets of LCM 3, five of LCM 6) fall in the order of numpy's sort implementation:
``SET_ORDERS["scalar"]`` is its portable introsort (numpy on Apple silicon, where the official
MLX code runs), ``SET_ORDERS["simd"]`` its x86 AVX2/AVX-512 sort; their training sets differ
in one ({1.5, 2, 3} against {1, 1.5, 2}) and in order.

Model (``model.py``): one contextual memory layer without embedding: complex 3x3 maps for keys
(k_t = W_phi x_t), values (v_t = W_psi x_{t+1}) and output, logits scaled by beta = 50, memory over
j < t. Each map's effective weights are those of a 6x6 real matrix drawn U(+-1/sqrt 6) (MLX's
Linear) and projected onto the complex-linear ones (``complexify``). 1 head of 3 complex dims, or
3 heads of one. Loss: the mean square of the error clipped to [-0.5, 0.5]; AdamW, the learning
rate decayed linearly to 5e-6 over 500 steps of batch 64.

Evaluation (``train_planets-3heads.py``): for every context length c = 1 .. 774, 25 steps are
generated after the first c true steps of 512 sequences of one training set (the 6th, {0.5, 1,
2.5}) and of the held-out set, with the model's streaming state (``rollout``). Two alignments of
the 25-step mean |error| are reported:
- ``paper``: the 25 generated steps x^_c .. x^_{c+24} against the truth x_c .. x_{c+24};
- ``official_plot``: the official plot's x^_{c+1} .. x^_{c+25} against x_c .. x_{c+24} (its
  ``gend[:, c:c+25]`` against ``y[:, c-1:c+24]``), one step off.
With 3 heads the error should fall once c passes the longest single period; with one head,
about the whole LCM.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np

from memcore.tasks import plots, protocol, runs, sweep
from memcore.tasks.moons_eval import ALIGNMENTS, rollout_error_jax, rollout_errors, summarize, table
from memcore.tasks.moons_model import MAPS, memory_model, torch_twin

__all__ = ["rollout_error_jax", "table"]  # the JAX twin's rollout; the results table
from memcore.tasks.train import TrainConfig, check_backend

PERIODS = tuple(Fraction(k, 2) for k in range(1, 8))  # 0.5, 1, ..., 3.5
STEPS_PER_UNIT = 800 / 18  # 800 / max LCM 6 / 3: three LCMs of the kept sets in a window
TOTAL_POINTS = 10_000  # the official time axis; starts lie below TOTAL_POINTS - 2 L - 1
PHASE = 0.3
HELD_OUT = (Fraction(1), Fraction(2), Fraction(3))
EVAL_TRAIN_INDEX = 5  # the official plot's training set: ``get_batch_...(5 - 5 * i)``
TEST_STREAM, VAL_STREAM = 3, 4  # the held-out sequences' generators (the same for every run)
LRS = (3e-3, 1e-2, 3e-2)  # around the official 1e-2
SEEDS = (100, 101, 102)  # the official seed first


def _sets(*rows) -> tuple:
    return tuple(tuple(Fraction(p).limit_denominator(2) for p in r) for r in rows)


# The 9 smallest LCMs in the order of np.argsort over the 35 sets in itertools order (the
# official ``planets.py``), for each of numpy's sort implementations; the last is held out.
SET_ORDERS = {
    "scalar": _sets((.5, 1, 2), (.5, 1, 1.5), (.5, 1.5, 3), (1, 1.5, 3), (.5, 1, 3), (.5, 1, 2.5),
                    (.5, 1.5, 2), (1.5, 2, 3), (1, 2, 3)),
    "simd": _sets((.5, 1, 2), (.5, 1, 1.5), (.5, 1, 3), (.5, 1.5, 3), (1, 1.5, 3), (.5, 1, 2.5),
                  (1, 1.5, 2), (.5, 1.5, 2), (1, 2, 3)),
}


def lcm(periods) -> Fraction:
    """Least common multiple of rational periods: the shortest time after which all repeat."""
    den = math.lcm(*(p.denominator for p in periods))
    return Fraction(math.lcm(*(int(p * den) for p in periods)), den)


def all_period_sets() -> list:
    """The 35 sets of 3 periods, in the official (itertools) order."""
    return list(itertools.combinations(PERIODS, 3))


def period_sets(order: str = "scalar") -> tuple[list, tuple]:
    """(the 8 training sets, the held-out set) in the official order of ``SET_ORDERS[order]``."""
    if order not in SET_ORDERS:
        raise ValueError(f"moons: set_order must be one of {list(SET_ORDERS)}, got {order!r}")
    kept = list(SET_ORDERS[order])
    return kept[:-1], kept[-1]


def sample(rng: np.random.Generator, periods_per_row, length: int) -> np.ndarray:
    """[n, length, 6] float32: row i follows ``periods_per_row[i]`` from a random start."""
    n = len(periods_per_row)
    start = rng.integers(0, max(1, TOTAL_POINTS - 2 * length - 1), size=n)
    t = (start[:, None] + np.arange(length)[None, :]) / STEPS_PER_UNIT  # [n, length]
    p = np.array([[float(q) for q in ps] for ps in periods_per_row])  # [n, 3]
    ang = 2 * np.pi * t[:, :, None] / p[:, None, :] + PHASE  # [n, length, 3]
    out = np.empty((n, length, 6), dtype=np.float32)
    out[..., 0::2] = np.cos(ang)
    out[..., 1::2] = np.sin(ang)
    return out


def rollout_error(model, seqs, contexts, horizon: int = 25) -> np.ndarray:
    """The ``paper`` alignment's 25-step errors of ``model`` (either backend's) at each
    context length, from its cached rollout."""
    return rollout_errors(torch_twin(model), seqs, contexts, horizon)["paper"]


def weight_moduli(model) -> dict:
    """|W| (the modulus of each complex entry, [3, 3]) of W_phi, W_psi and W_out."""
    sd = {k: np.asarray(v.detach(), dtype=np.float64)
          for k, v in torch_twin(model).state_dict().items()}
    return {m: np.hypot(sd[f"{m}.re"], sd[f"{m}.im"]).round(5).tolist() for m in MAPS}


def clipped_loss(model, x, y):
    err = (model(x) - y).clamp(-0.5, 0.5)
    loss = (err * err).mean()
    return loss, loss


def clipped_loss_jax(model, x, y):
    """``clipped_loss`` for the JAX twin (``jax_stack.JaxMoonsMemory``)."""
    import jax.numpy as jnp

    err = jnp.clip(model(x) - y, -0.5, 0.5)
    loss = jnp.mean(err * err)
    return loss, loss


# -- the protocol --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoonsConfig:
    """The data, the training (the official values by default) and the evaluation: test curves
    at every ``context_step``-th context of ``eval_sequences`` sequences per set; the validation
    error (the learning rate's choice) at every ``val_context_step``-th context of
    ``val_sequences`` sequences of the training sets."""

    length: int = 800
    batch_size: int = 64
    steps: int = 500
    final_lr: float = 5e-6
    eval_sequences: int = 512
    context_step: int = 1
    horizon: int = 25
    val_sequences: int = 64
    val_context_step: int = 25
    set_order: str = "scalar"
    official_cache: bool = False

    def __post_init__(self):
        runs.check_counts("moons", self, ("length", "batch_size", "steps", "eval_sequences",
                                          "context_step", "horizon", "val_sequences",
                                          "val_context_step"))
        if self.length <= self.horizon + 1:
            raise ValueError(f"moons: length must exceed horizon + 1 = {self.horizon + 1}, "
                             f"got {self.length}")
        period_sets(self.set_order)

    def contexts(self, step: int) -> list:
        """c = 1, 1 + step, ... < length - horizon (the official 1 .. 774 at step 1)."""
        return list(range(1, self.length - self.horizon, step))


OFFICIAL = MoonsConfig()


def deviations(cfg: MoonsConfig, lr_sweep: protocol.Sweep, backend: str) -> list[str]:
    """This run's departures from the official protocol, from its configuration."""
    o, out = OFFICIAL, []
    for name, what in (("length", "sequence length"), ("batch_size", "batch"),
                       ("steps", "training steps"), ("final_lr", "final learning rate"),
                       ("eval_sequences", "test sequences per set"),
                       ("horizon", "generated steps")):
        if getattr(cfg, name) != getattr(o, name):
            out.append(f"{what} {getattr(cfg, name)} instead of {getattr(o, name)}")
    if cfg.context_step != 1:
        out.append(f"every {cfg.context_step}th context length instead of every one")
    if cfg.set_order != "scalar":
        out.append("the training sets in the tie order of numpy's x86 SIMD argsort, not of "
                   "its portable introsort (Apple silicon, where the official code runs)")
    if not cfg.official_cache:
        out.append("generation with the streaming state (every pair gets its value when its "
                   "successor comes in); the official cached generate leaves the values of the "
                   "last context position and of every generated position at zero")
    if backend != "torch":
        out.append(f"trained with --backend {backend}; evaluated by the torch rollout")
    out += lr_sweep.deviations()
    out.append(f"learning rate chosen on the validation error ({cfg.val_sequences} sequences "
               f"of the training sets, disjoint from the test sequences, every "
               f"{cfg.val_context_step}th context); the official code has one rate, 1e-2")
    return out


def eval_sets(cfg: MoonsConfig) -> dict:
    """The test curves' period sets: the official plot's training set and the held-out set."""
    train, held = period_sets(cfg.set_order)
    return {"train " + _name(train[EVAL_TRAIN_INDEX]): train[EVAL_TRAIN_INDEX],
            "held-out " + _name(held): held}


def held_out_sequences(cfg: MoonsConfig) -> tuple[dict, np.ndarray]:
    """({set name: test sequences}, validation sequences [val_sequences, length, 6] cycling
    over the training sets): the same for every model and seed, none in both."""
    rng = np.random.default_rng([TEST_STREAM])
    test = {k: sample(rng, [ps] * cfg.eval_sequences, cfg.length)
            for k, ps in eval_sets(cfg).items()}
    train, _ = period_sets(cfg.set_order)
    vrng = np.random.default_rng([VAL_STREAM])
    sets = [train[i % len(train)] for i in range(cfg.val_sequences)]
    every = np.concatenate(list(test.values()))
    (val,) = protocol.held_out(lambda n: (sample(vrng, sets[:n], cfg.length),),
                               cfg.val_sequences, (every,))
    protocol.check_disjoint((val,), (every,))
    return test, val


def heads_of(name: str) -> int:
    return int(name.split()[0])


def model_name(heads: int) -> str:
    return f"{heads} head" + ("s" if heads > 1 else "")


CHECKPOINTS = 10  # per run: an interrupted run resumes from the last of them


def run_one(name: str, lr: float, seed: int, sub: str | None, cfg: MoonsConfig, device: str,
            backend: str, log_every: int, quiet: bool) -> dict:
    """Train one model at ``lr`` and ``seed`` (the official schedule) and evaluate its final
    state: the validation error, the test curves of both alignments and the weights."""
    train_sets, _ = period_sets(cfg.set_order)

    def batches(step):
        rng = np.random.default_rng([seed, step])
        pick = rng.integers(0, len(train_sets), size=cfg.batch_size)
        x = sample(rng, [train_sets[i] for i in pick], cfg.length + 1)
        return x[:, :-1], x[:, 1:]

    checkpoints, resume = sweep.checkpointing(sub, max(1, cfg.steps // CHECKPOINTS))
    tcfg = TrainConfig(steps=cfg.steps, lr=lr, weight_decay=0.0, seed=seed,
                       schedule="linear", min_lr_ratio=cfg.final_lr / lr, grad_clip=None,
                       log_every=log_every, device=device, out_dir=sub, **checkpoints)
    model, res, params = runs.train_model(
        backend, memory_model(backend, heads_of(name), seed), batches, tcfg,
        {"torch": {"loss_fn": clipped_loss}, "jax": {"loss_fn": clipped_loss_jax}},
        resume=resume, name=name, quiet=quiet)
    twin = torch_twin(model).to("cpu").eval()
    test, val = held_out_sequences(cfg)
    val_err = rollout_errors(twin, val, cfg.contexts(cfg.val_context_step), cfg.horizon,
                             cfg.official_cache)["paper"]
    curves = {a: {} for a in ALIGNMENTS}
    for k, seqs in test.items():
        errs = rollout_errors(twin, seqs, cfg.contexts(cfg.context_step), cfg.horizon,
                              cfg.official_cache)
        for a in ALIGNMENTS:
            curves[a][k] = [round(float(e), 5) for e in errs[a]]
    held = [k for k in test if k.startswith("held-out")][0]
    return {"lr": lr, "seed": seed, "val_error": float(val_err.mean()),
            "held_out_error": float(np.mean(curves["paper"][held])),
            "final_loss": res["losses"][-1], "curves": curves,
            "weights": weight_moduli(twin), "params": params,
            "seconds": round(res["seconds"], 1)}


def run(cfg: MoonsConfig = OFFICIAL, heads=(1, 3), lrs=LRS, seeds=SEEDS, device: str = "cpu",
        out_dir: str | None = None, backend: str = "torch", log_every: int = 50,
        quiet: bool = False, jobs: int = 1) -> dict:
    """Every (heads, learning rate, seed) of the sweep, each model's rate chosen on validation;
    results.json and the plots (the error curves, the learned weights) under ``out_dir``."""
    check_backend(backend)
    lr_sweep = protocol.Sweep(tuple(lrs), tuple(seeds))
    for h in heads:
        if h not in (1, 3):
            raise ValueError(f"--heads must be 1 or 3 (3 complex dims in all), got {h}")
    say = runs.say_unless(quiet)
    t0 = time.time()
    train_sets, held = period_sets(cfg.set_order)
    sets = eval_sets(cfg)
    results = {"config": asdict(cfg), "backend": backend,
               "sweep": {"lrs": list(lr_sweep.lrs), "seeds": list(lr_sweep.seeds)},
               "deviations": deviations(cfg, lr_sweep, backend),
               "train_sets": [_name(s) for s in train_sets], "held_out": _name(held),
               "contexts": cfg.contexts(cfg.context_step), "alignments": {
                   "paper": "x^_c .. x^_{c+24} against x_c .. x_{c+24} (the paper's text)",
                   "official_plot": "x^_{c+1} .. x^_{c+25} against x_c .. x_{c+24} (the "
                                    "official plot's indices)"},
               "marks": {k: {"periods": [float(p) * STEPS_PER_UNIT for p in ps],
                             "lcm": float(lcm(ps)) * STEPS_PER_UNIT}
                         for k, ps in sets.items()},
               "models": {}}
    say("memcore moons: deviations from the official protocol:")
    for dv in results["deviations"]:
        say(f"  - {dv}")
    names = [model_name(h) for h in heads]
    done = sweep.run_all("moons", run_one, names, lr_sweep,
                         {"task": asdict(cfg), "backend": backend},
                         (cfg, device, backend, log_every, quiet), out_dir, jobs, say,
                         lambda r: f"val {r['val_error']:.4f} held-out {r['held_out_error']:.4f}")
    for name in names:
        results["models"][name] = line = summarize(done[name])
        say(f"[{name}] lr {line['lr']:.1e}: held-out 25-step error {line['held_out_error']:.3f} "
            f"+- {line['held_out_error_std']:.3f} (mean over contexts)")
    out = runs.finish(results, out_dir, t0, plots.moons_error, "moons.png")
    if out_dir:
        import os

        out["weights_plot"] = plots.moons_weights(out, os.path.join(out_dir,
                                                                    "moons_weights.png"))
    return out


def _name(ps) -> str:
    return "{" + ", ".join(f"{float(p):g}" for p in ps) + "}"
