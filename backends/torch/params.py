"""memcore's parameter dict on an ``nn.Module``: registered under the dotted names of
``memcore.init`` (nested holder modules), and read back per compute dtype."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Holder(nn.Module):
    """A plain container: parameters and children only, so that dotted ``memcore.init`` names
    become nested module paths."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("a parameter holder has no forward")


def register_params(module: nn.Module, params: dict) -> None:
    """Register every ``name -> array`` of ``params`` on ``module`` under its dotted name."""
    for name, value in params.items():
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = Holder()
                owner.add_module(part, child)
            owner = child
        arr = value.detach().clone() if isinstance(value, torch.Tensor) else torch.from_numpy(
            np.array(value, copy=True))
        owner.register_parameter(leaf, nn.Parameter(arr))


def param_dict(module: nn.Module, dtype: torch.dtype) -> dict:
    """The module's parameters by dotted name, cast to the compute dtype (a no-op cast keeps
    the parameter itself on the graph)."""
    return {n: (p if p.dtype == dtype else p.to(dtype)) for n, p in module.named_parameters()}


def step_params(module: nn.Module, dtype: torch.dtype) -> dict:
    """``param_dict`` for per-token calls, without walking the module tree each token: kept
    while every parameter is the same object, with ``dtype`` (training updates parameters in
    place, and ``.to()`` swaps their data, so the kept tensors stay current); never kept when
    a cast is needed, as a cast copy would not follow the parameter."""
    kept = module.__dict__.get("_step_params")
    if kept is not None and kept[0] == dtype and all(
            owner._parameters.get(leaf) is p and p.dtype == dtype for owner, leaf, p in kept[1]):
        return kept[2]
    entries = [(m, leaf, p) for _, m in module.named_modules()
               for leaf, p in m._parameters.items() if p is not None]
    params = param_dict(module, dtype)
    if all(p.dtype == dtype for _, _, p in entries):
        module.__dict__["_step_params"] = (dtype, entries, params)
    return params


def sub(p: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def check_like_params(module: nn.Module, x, name: str) -> None:
    """x must sit on the parameters' device and have their dtype."""
    ref = next(module.parameters(), None)
    if ref is None:
        return
    if x.device != ref.device:
        raise ValueError(f"{name} is on device {x.device}, but the parameters are on "
                         f"{ref.device}; move one of them (module.to(device))")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, but the parameters have dtype "
                        f"{ref.dtype}; cast one of them (e.g. module.to({x.dtype}))")
