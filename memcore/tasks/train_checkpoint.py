"""The torch training loop's checkpoints: one safetensors file holding tensors
``model.<name>``, ``optim.<i>.<key>`` and ``rng.torch``, and the scalars (step, optimizer
hyperparameters, the run's config and history, the model's spec) as JSON in its metadata,
written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from memcore.atomic_files import atomic_write
from memcore.tasks.runs import spec_of


def save_checkpoint(path: str, model, optimizer, step: int, cfg,
                    history: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{n}": p.detach().cpu().contiguous() for n, p in
               model.state_dict().items()}
    sd = optimizer.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{i}.{k}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    meta = {"step": step, "backend": "torch", "param_groups": groups, "config": asdict(cfg),
            "history": history, "spec": spec_of(model)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp,
                                             metadata={"train_state": json.dumps(meta)}),
                 prefix=".ckpt-")


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restore model, optimizer and torch RNG from ``path``; returns the JSON scalars."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["train_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    own = model.state_dict()
    got = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(got) != set(own):
        raise ValueError(f"checkpoint {path} holds another model: parameters "
                         f"{sorted(set(got) ^ set(own))[:5]} differ")
    model.load_state_dict(got)
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return meta
