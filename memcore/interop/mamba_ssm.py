"""mamba-ssm's ``Mamba`` module as memcore's ``mamba`` spec and params."""

from __future__ import annotations

import math

import numpy as np

from memcore.spec import Mamba
from memcore.spec.params import check_params

from .arrays import as_dict, shape_error, to_numpy

__all__ = ["from_mamba_ssm"]

_MAMBA_KEYS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
               "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight")


def from_mamba_ssm(state_dict, d_conv: int | None = None) -> tuple[Mamba, dict]:
    """A mamba-ssm ``Mamba`` module's state dict as memcore's ``mamba`` spec and params.

    Names map 1:1 (memcore's Mamba block uses mamba-ssm's names and layouts). d_model, d_inner
    (hence expand), d_state, d_conv and dt_rank are read from the shapes; ``d_conv``, if given,
    must agree with conv1d.weight. A module built with ``conv_bias=False`` has no conv1d.bias:
    it maps to a zero bias, which is the same function. A module built with ``bias=True``
    (in_proj.bias, out_proj.bias) is refused: memcore's block has no such biases.
    """
    owner = "from_mamba_ssm"
    sd = as_dict(owner, state_dict)
    biases = sorted(k for k in ("in_proj.bias", "out_proj.bias") if k in sd)
    if biases:
        raise ValueError(f"{owner}: the module has {biases} (built with bias=True); memcore's "
                         f"Mamba block has no in_proj/out_proj bias, so it cannot be mapped")
    required = [k for k in _MAMBA_KEYS if k != "conv1d.bias"]
    missing = sorted(k for k in required if k not in sd)
    unknown = sorted(set(sd) - set(_MAMBA_KEYS))
    if missing or unknown:
        raise ValueError(f"{owner}: state_dict keys do not match a mamba-ssm Mamba module: "
                         f"missing {missing}, unknown {unknown}")
    p = {k: to_numpy(k, v) for k, v in sd.items()}

    w_in = p["in_proj.weight"]
    if w_in.ndim != 2 or w_in.shape[0] % 2:
        raise shape_error(owner, "in_proj.weight", "[2 * d_inner, d_model]", w_in.shape)
    Di, D = w_in.shape[0] // 2, w_in.shape[1]
    if Di % D:
        raise ValueError(f"{owner}: d_inner={Di} (in_proj.weight rows / 2) is not a multiple of "
                         f"d_model={D}; memcore's spec needs an integer expand")
    conv = p["conv1d.weight"]
    if conv.ndim != 3 or conv.shape[:2] != (Di, 1):
        raise shape_error(owner, "conv1d.weight", f"[{Di}, 1, d_conv]", conv.shape)
    K = conv.shape[2]
    if d_conv is not None and d_conv != K:
        raise ValueError(f"{owner}: d_conv={d_conv} was given but conv1d.weight has width {K}")
    a_log = p["A_log"]
    if a_log.ndim != 2 or a_log.shape[0] != Di:
        raise shape_error(owner, "A_log", f"[{Di}, d_state]", a_log.shape)
    N = a_log.shape[1]
    dt_w = p["dt_proj.weight"]
    if dt_w.ndim != 2 or dt_w.shape[0] != Di:
        raise shape_error(owner, "dt_proj.weight", f"[{Di}, dt_rank]", dt_w.shape)
    R = dt_w.shape[1]
    if "conv1d.bias" not in p:
        p["conv1d.bias"] = np.zeros((Di,), dtype=conv.dtype)
    spec = Mamba(D, d_state=N, d_conv=K, expand=Di // D,
                 dt_rank="auto" if R == math.ceil(D / 16) else R)
    # The remaining shapes (x_proj, dt_proj.bias, D, out_proj) follow from the spec.
    try:
        check_params(spec, p)
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None
    return spec, p
