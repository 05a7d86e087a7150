"""Byte-level language modelling on any text file, and length generalisation.

Each model trains on random windows of L bytes from the first 90% of the file (next-byte loss at
every position), then is evaluated on windows of 4L bytes from the last 10%: the mean loss at
every position shows whether it keeps improving with more context, stays flat, or breaks down
past the training length.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import memcore
from memcore import spec as S
from memcore.tasks import plots, runs
from memcore.tasks.train import TrainConfig, check_backend

MODELS = ("bmojo", "mamba", "transformer", "transformer_window", "bmojo_f", "mosaic", "jamba")
VOCAB = 256  # bytes
HELD_OUT = 0.1


@dataclass(frozen=True)
class LMConfig:
    """The models' sizes (``n_layers`` blocks), the training and the held-out evaluation
    (``eval_windows`` windows of ``eval_factor`` * ``seq_len`` bytes)."""

    seq_len: int = 128  # training length L; evaluation runs to 4L
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    d_state: int = 8
    window: int = 32
    chunk: int = 32
    select: int = 4
    capacity: int = 32
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    eval_windows: int = 16
    eval_factor: int = 4

    def __post_init__(self):
        runs.check_counts("lm", self, ("seq_len", "d_model", "n_heads", "n_layers",
                                       "batch_size", "steps", "eval_windows", "eval_factor"))
        if self.seq_len < 2:
            raise ValueError(f"lm: seq_len must be >= 2, got {self.seq_len}")


def lm_spec(name: str, cfg: LMConfig):
    """A byte-level model spec: ``n_layers`` blocks with an MLP (Memory Mosaics: persistent
    memory in its place)."""
    d, h = cfg.d_model, cfg.n_heads
    if name == "jamba":
        return S.jamba(d, h, pattern="MA", n_layers=cfg.n_layers, vocab_size=VOCAB,
                       d_state=cfg.d_state, ffn="mlp")
    layers = {
        "bmojo": lambda: S.bmojo(d, h, window=cfg.window, chunk=cfg.chunk, select=cfg.select,
                                 capacity=cfg.capacity, d_state=cfg.d_state),
        "bmojo_f": lambda: S.bmojo_f(d, h, window=cfg.window, d_state=cfg.d_state),
        "mamba": lambda: S.mamba(d, d_state=cfg.d_state),
        "transformer": lambda: S.transformer(d, h),
        "transformer_window": lambda: S.transformer(d, h, window=cfg.window),
        "mosaic": lambda: S.mosaic(d, h),
    }
    if name not in layers:
        raise ValueError(f"unknown model {name!r}; choose among {list(MODELS)}")
    ffn = "persistent" if name == "mosaic" else "mlp"
    return S.model([layers[name]() for _ in range(cfg.n_layers)], VOCAB, ffn=ffn)


def read_bytes(path: str, min_len: int) -> np.ndarray:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(f"--text: no such file: {path!r}")
    data = np.frombuffer(open(path, "rb").read(), dtype=np.uint8).astype(np.int64)
    if len(data) < min_len:
        raise ValueError(f"--text: {path} holds {len(data)} bytes; this configuration needs at "
                         f"least {min_len} (10% held out must fit one 4L window)")
    return data


class NextByte(torch.nn.Module):
    """The model realization behind the loop's interface: ``forward(tokens, mask)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.aux_loss = None  # the last forward's aux (the loop reads it)

    def forward(self, tokens, mask=None):
        logits, _, self.aux_loss = self.model.forward_aux(tokens)
        return logits if mask is None else logits[mask]


def next_token_model(backend: str, spec, seed: int):
    """``spec``'s realization with ``memcore.init(spec, seed)``'s parameters behind the loop's
    interface: ``NextByte`` (torch) or ``jax_stack.JaxNextByte``."""
    if backend == "jax":
        from memcore.tasks.jax_stack import JaxNextByte

        return JaxNextByte(spec, seed=seed)
    return NextByte(memcore.realize(spec, backend="torch", params=memcore.init(spec, seed)))


def _windows(data: np.ndarray, n: int, length: int, rng: np.random.Generator):
    starts = rng.integers(0, len(data) - length, size=n)
    return np.stack([data[s:s + length] for s in starts])


def loss_by_position_jax(model, data: np.ndarray, cfg: LMConfig, seed: int) -> np.ndarray:
    """``loss_by_position`` for a ``jax_stack.JaxNextByte`` (the same windows)."""
    from memcore.tasks.jax_stack import logits_at

    T = cfg.eval_factor * cfg.seq_len
    w = _windows(data, cfg.eval_windows, T + 1, np.random.default_rng([seed, 9]))
    total = np.zeros(T, dtype=np.float64)
    for s in range(0, len(w), 4):
        xb = w[s:s + 4]
        logits = torch.from_numpy(np.array(logits_at(model, xb[:, :-1])))
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.as_tensor(xb[:, 1:]),
                                                reduction="none")
        total += nll.sum(0).double().numpy()
    return total / len(w)


@torch.no_grad()
def loss_by_position(model, data: np.ndarray, cfg: LMConfig, seed: int) -> np.ndarray:
    """Mean next-byte loss (nats) at each position 0 .. eval_factor * L - 1 of held-out
    windows."""
    T = cfg.eval_factor * cfg.seq_len
    w = torch.as_tensor(_windows(data, cfg.eval_windows, T + 1, np.random.default_rng([seed, 9])))
    dev = next(model.parameters()).device
    total = torch.zeros(T, dtype=torch.float64)
    for s in range(0, len(w), 4):
        xb = w[s:s + 4].to(dev)
        logits = model(xb[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), xb[:, 1:],
                                                reduction="none")
        total += nll.sum(0).double().cpu()
    return (total / len(w)).numpy()


def run(text: str, models, cfg: LMConfig = LMConfig(), seed: int = 0, device: str = "cpu",
        out_dir: str | None = None, backend: str = "torch", log_every: int = 50,
        resume: bool = False, checkpoint_every: int = 0, quiet: bool = False) -> dict:
    check_backend(backend)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose among {list(MODELS)}")
    T_eval = cfg.eval_factor * cfg.seq_len + 1
    data = read_bytes(text, int(np.ceil(T_eval / HELD_OUT)) + 1)
    cut = int(len(data) * (1 - HELD_OUT))
    train_data, test_data = data[:cut], data[cut:]
    say = runs.say_unless(quiet)
    t0 = time.time()
    results = {"text": os.path.abspath(text), "config": asdict(cfg), "seed": seed,
               "backend": backend, "models": {}}
    for name in models:
        spec = lm_spec(name, cfg)

        def batches(step, L=cfg.seq_len):
            w = _windows(train_data, cfg.batch_size, L + 1, np.random.default_rng([seed, step]))
            return w[:, :-1], w[:, 1:]

        sub = os.path.join(out_dir, name) if out_dir else None
        tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=seed, log_every=log_every,
                           warmup=min(50, cfg.steps // 10), min_lr_ratio=0.1, out_dir=sub,
                           checkpoint_every=checkpoint_every, device=device)
        model, res, params = runs.train_model(
            backend, next_token_model(backend, spec, seed), batches, tcfg,
            resume=resume, name=name, quiet=quiet)
        per = (loss_by_position_jax if backend == "jax" else loss_by_position)(
            model, test_data, cfg, seed)
        L = cfg.seq_len
        results["models"][name] = {
            "train_loss": float(np.mean(res["losses"][-10:])) if res["losses"] else None,
            "loss_within_L": float(per[:L].mean()),
            "loss_L_to_4L": float(per[L:].mean()),
            "loss_by_position": [round(float(v), 5) for v in per],
            "params": params, "seconds": round(res["seconds"], 1)}
        say(f"[{name}] held-out loss (nats/byte): positions < L {per[:L].mean():.3f}, "
            f"L..4L {per[L:].mean():.3f}")
    return runs.finish(results, out_dir, t0, plots.loss_by_position, "lm.png")


def table(results: dict) -> str:
    return runs.table(f"{'model':<20} {'train':>7} {'<L':>7} {'L..4L':>7} {'params':>9}", 54,
                      (f"{name:<20} {r['train_loss']:>7.3f} {r['loss_within_L']:>7.3f} "
                       f"{r['loss_L_to_4L']:>7.3f} {r['params']:>9,}"
                       for name, r in results["models"].items()))
