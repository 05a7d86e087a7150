"""Entry point of the ``torch`` backend: ``realize(spec, params=None, seed=0, **options)``."""

from __future__ import annotations

import torch
from memcore.spec.base import Spec
from memcore.spec.layers import LAYER_KINDS
from memcore.spec.model import Model
from memcore.spec.params import init
from memcore.spec.sizes import check_allocation

from .modules import TorchLayer, TorchModel

OPTIONS = ("device", "dtype")


def realize(spec: Spec, params: dict | None = None, seed: int = 0, **options):
    """A ``torch.nn.Module`` for a layer or model spec, holding ``params`` (default:
    ``memcore.init(spec, seed)``) as parameters named as in ``memcore.init``.

    options: ``device`` and ``dtype`` move the module after construction.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"realize (torch): unknown options {unknown}; known options: "
                        f"{list(OPTIONS)}")
    dtype = options.get("dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"realize (torch): dtype must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(spec, (Model,) + LAYER_KINDS):
        raise TypeError(f"spec must be a memcore layer or model spec, got {spec!r}")
    params = init(spec, seed) if params is None else params
    check_allocation(spec, what="state")
    module = TorchModel(spec, params) if isinstance(spec, Model) else TorchLayer(spec, params)
    if options.get("device") is not None or dtype is not None:
        module = module.to(device=options.get("device"), dtype=dtype)
    return module
