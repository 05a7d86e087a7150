"""The tasks' training loop on the JAX backend: the same ``TrainConfig`` and behaviour as
``memcore.tasks.train`` (torch), with optax and a jitted step (``eqx.filter_jit``).

- AdamW (``optax.adamw``) with weight decay on matrices only, betas and eps as torch's; the
  learning rate of step s is ``train.lr_at(s, cfg)`` (warmup, cosine or linear decay to
  ``lr * min_lr_ratio``), fed to the optimizer state each step (``optax.inject_hyperparams``),
  so the schedule costs no recompilation.
- Gradient clipping as ``torch.nn.utils.clip_grad_norm_``: scale by
  min(1, clip / (global norm + 1e-6)).
- Loss: cross-entropy over the labelled positions only (labels != IGNORE), the logits computed
  only there, plus ``aux_weight`` times the bmojo layers' innovation loss.
- Evaluation every ``eval_every`` steps and at the end, early stop above ``early_stop``; the
  same JSON-lines log (``log.jsonl``) and progress lines as the torch loop.
- A checkpoint is one safetensors file (never pickle), written to a temporary file and moved
  into place: ``model.<name>`` under the torch model's parameter names, ``optim.<path>`` for each
  leaf of the optax state, and JSON metadata (step, config, history, ``"backend": "jax"``).
  Batches and learning rates are pure functions of (seed, step) and the model has no random
  state, so resuming replays the uninterrupted run.

Shapes: the labelled positions are gathered into an index array padded to a power of two, and
``pad_time`` rounds the time axis up (right padding with ``pad_token`` and unlabelled targets,
exact for causal models except for the padded positions' share of the innovation loss), so a
task whose batches vary in length compiles few shapes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memcore.checkpoint import atomic_write
from memcore.tasks import jax_stack
from memcore.tasks.jax_stack import pad_positions
from memcore.tasks.mqar import IGNORE
from memcore.tasks.train import TrainConfig, lr_at, run_steps, spec_of, start_run

F32 = jnp.float32
CLIP_EPS = 1e-6  # torch's clip_grad_norm_ adds it to the norm


def jax_device(device: str):
    """``--device`` for the JAX backend: 'cpu', or 'cuda'/'gpu' (optionally ':N')."""
    if not isinstance(device, str):
        raise ValueError(f"--device must be a string such as 'cpu' or 'cuda', got {device!r}")
    kind, _, idx = device.partition(":")
    platform = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}.get(kind)
    if platform is None or (idx and not idx.isdigit()):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N' under --backend jax, "
                         f"got {device!r}")
    try:
        devices = jax.devices(platform)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r}: JAX finds no {platform} device on this "
                         f"machine") from err
    i = int(idx or 0)
    if i >= len(devices):
        raise ValueError(f"--device {device!r}: JAX sees {len(devices)} {platform} device(s)")
    return devices[i]


def _decay_mask(params):
    # Weight decay on matrices only; norms, gains and 1-d parameters are left alone (as torch).
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with torch's defaults (eps 1e-8), the learning rate set per step. One object per
    (betas, weight decay): the jitted step is cached on it, so runs alike compile once."""
    b1, b2 = (float(b) for b in cfg.betas)
    return _adamw(b1, b2, float(cfg.weight_decay))


@functools.lru_cache(maxsize=16)
def _adamw(b1: float, b2: float, weight_decay: float):
    # Only the learning rate lives in the state (float32, also under jax_enable_x64): the
    # others stay Python floats, so no float64 scalar promotes the moments or parameters.
    static = ("b1", "b2", "eps", "weight_decay", "mask")
    return optax.inject_hyperparams(optax.adamw, static_args=static)(
        learning_rate=jnp.asarray(0.0, F32), b1=b1, b2=b2, eps=1e-8,
        weight_decay=weight_decay, mask=_decay_mask)


def trainable(model):
    return eqx.filter(model, eqx.is_inexact_array)


def masked_loss(model, inputs, positions, targets, weights, aux_weight: float):
    """Mean cross-entropy at the gathered positions (``weights`` 0 on padding), plus the weighted
    aux loss. Returns (total, cross_entropy)."""
    logits, aux = jax_stack.logits_aux(model, inputs, positions)
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    ce = jnp.sum(nll * weights) / jnp.sum(weights)
    total = ce if aux is None or not aux_weight else ce + aux_weight * aux
    return total, ce


def _clip(grads, max_norm):
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    scale = jnp.minimum(1.0, max_norm / (norm + CLIP_EPS)).astype(F32)
    return jax.tree_util.tree_map(lambda g: g * scale, grads)


@eqx.filter_jit
def _step(model, opt_state, batch, optimizer, loss_fn, loss_args, grad_clip):
    # loss_args: static (hashable) trailing arguments of loss_fn, e.g. the aux weight.
    (_, reported), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, *batch,
                                                                            *loss_args)
    if grad_clip:
        grads = _clip(grads, grad_clip)
    updates, opt_state = optimizer.update(grads, opt_state, trainable(model))
    return eqx.apply_updates(model, updates), opt_state, reported


def pad_time(inputs: np.ndarray, labels: np.ndarray, multiple: int, pad_token: int):
    """Right-pad [B, T] inputs (with ``pad_token``) and labels (with IGNORE) to a multiple of
    ``multiple`` positions."""
    T = inputs.shape[1]
    extra = -T % multiple
    if not extra:
        return inputs, labels
    return (np.pad(inputs, ((0, 0), (0, extra)), constant_values=pad_token),
            np.pad(labels, ((0, 0), (0, extra)), constant_values=IGNORE))


def _masked_batch(inputs, labels, time_multiple: int, pad_token: int):
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if inputs.shape != labels.shape or inputs.ndim != 2:
        raise ValueError(f"batch_fn must return inputs and labels of one [B, T] shape, got "
                         f"{inputs.shape} and {labels.shape}")
    if time_multiple > 1:
        inputs, labels = pad_time(inputs, labels, time_multiple, pad_token)
    mask = labels != IGNORE
    if not mask.any():
        raise ValueError("batch_fn returned a batch without any labelled position")
    pos, w, n = pad_positions(mask)
    tgt = np.zeros(len(pos), dtype=np.int32)
    tgt[:n] = labels.reshape(-1)[pos[:n]]
    return inputs, (jnp.asarray(inputs), jnp.asarray(pos), jnp.asarray(tgt), jnp.asarray(w))


# -- checkpoints ---------------------------------------------------------------------------------

def _opt_leaves(opt_state) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(opt_state)
    return {"optim" + jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def save_checkpoint(path: str, model, opt_state, step: int, cfg: TrainConfig,
                    history: dict) -> None:
    from safetensors.numpy import save_file

    # np.array, not np.ascontiguousarray: the latter turns the 0-d step counts into [1].
    tensors = {f"model.{k}": np.array(v) for k, v in jax_stack.state_dict(model).items()}
    for k, v in _opt_leaves(opt_state).items():
        tensors[k] = np.array(v)
    meta = {"step": step, "backend": "jax", "config": asdict(cfg), "history": history,
            "spec": spec_of(model)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp,
                                             metadata={"train_state": json.dumps(meta)}),
                 prefix=".ckpt-")


def load_checkpoint(path: str, model, opt_state):
    """(model, opt_state, metadata) restored from ``path``."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    with safe_open(path, framework="numpy") as f:
        meta = json.loads(f.metadata()["train_state"])
    if meta.get("backend", "torch") != "jax":
        raise ValueError(f"--resume: {path} was written by the {meta.get('backend', 'torch')} "
                         f"backend; resume it with --backend {meta.get('backend', 'torch')}")
    tensors = load_file(path)
    model = jax_stack.load_state_dict(model, {k[len("model."):]: v for k, v in tensors.items()
                                              if k.startswith("model.")})
    own = _opt_leaves(opt_state)
    got = {k: v for k, v in tensors.items() if k.startswith("optim")}
    if set(own) != set(got):
        raise ValueError(f"checkpoint {path} holds another optimizer state: entries "
                         f"{sorted(set(own) ^ set(got))[:5]} differ")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    new = []
    for p, leaf in leaves:
        key, a = "optim" + jax.tree_util.keystr(p), np.asarray(leaf)
        if got[key].shape != a.shape:
            raise ValueError(f"checkpoint {path}: {key} has shape {got[key].shape}, expected "
                             f"{a.shape}")
        new.append(jnp.asarray(got[key], dtype=a.dtype))
    return model, jax.tree_util.tree_unflatten(treedef, new), meta


# -- the loop ------------------------------------------------------------------------------------

def train(model, batch_fn: Callable, cfg: TrainConfig, eval_fn: Callable | None = None,
          resume: bool = False, name: str = "model", quiet: bool = False,
          loss_fn: Callable | None = None, time_multiple: int = 1, pad_token: int = 0) -> dict:
    """Train the JAX ``model`` (a model realization, or ``jax_stack.JaxMoonsMemory``) for
    ``cfg.steps`` AdamW steps on ``batch_fn(step) -> (inputs, labels)`` (IGNORE where
    unlabelled). ``eval_fn(model)`` (a float, or a dict with "val") as in the torch loop.
    ``loss_fn(model, *batch) -> (total, reported)`` (pure, traceable) replaces the masked
    cross-entropy; the batch is then passed as arrays.
    Returns the torch loop's dict plus "model": the trained model (modules are immutable)."""
    if isinstance(time_multiple, bool) or not isinstance(time_multiple, int) or \
            time_multiple < 1:
        raise ValueError(f"time_multiple must be an int >= 1, got {time_multiple!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("torchrun data parallel (WORLD_SIZE > 1) runs only with --backend "
                         "torch; --backend jax trains in one process")
    dev = jax_device(cfg.device)
    with jax.default_device(dev):
        return _train(model, dev, batch_fn, cfg, eval_fn, resume, name, quiet, loss_fn,
                      time_multiple, pad_token)


def _train(model, dev, batch_fn, cfg, eval_fn, resume, name, quiet, loss_fn, time_multiple,
           pad_token) -> dict:
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(trainable(model))

    def load(path: str) -> dict:
        nonlocal model, opt_state
        model, opt_state, meta = load_checkpoint(path, model, opt_state)
        return meta

    run = start_run(cfg, name, quiet, resume, load, spec=spec_of(model), backend="jax")
    # Every input of the step committed to one device: a mix of committed and uncommitted
    # arrays would compile the step twice.
    model, opt_state = jax.device_put((model, opt_state), dev)
    loss, loss_args = (masked_loss, (float(cfg.aux_weight),)) if loss_fn is None else \
        (loss_fn, ())
    clip = float(cfg.grad_clip) if cfg.grad_clip else None

    def step_fn(step: int) -> float:
        nonlocal model, opt_state
        raw = batch_fn(step)
        if loss_fn is None:
            inputs, batch = _masked_batch(*raw, time_multiple, pad_token)
            jax_stack.check_inputs(model, inputs)
        else:
            batch = tuple(jnp.asarray(a) for a in raw)
        batch = jax.device_put(batch, dev)
        opt_state.hyperparams["learning_rate"] = jax.device_put(
            np.asarray(lr_at(step, cfg), np.float32), dev)
        model, opt_state, reported = _step(model, opt_state, batch, optimizer, loss, loss_args,
                                           clip)
        return float(reported)

    def save(path: str, step: int, history: dict) -> None:
        save_checkpoint(path, model, opt_state, step, cfg, history)

    res = run_steps(cfg, name, quiet, run, step_fn,
                    None if eval_fn is None else lambda final: eval_fn(model), save)
    return {**res, "model": model}
