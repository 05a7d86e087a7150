"""from_mamba_ssm: a mamba-ssm ``Mamba`` state dict maps onto memcore's ``mamba`` realization.

Two oracles: mamba-ssm's own module (its pure-torch path, ``selective_scan_ref``), when
mamba-ssm is installed; and a plain loop over mamba-ssm's documented math, always.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest

import memcore
from memcore.interop import from_mamba_ssm

# (d_model, d_state, d_conv, expand, dt_rank, conv_bias)
CONFIGS = [(16, 4, 4, 2, "auto", True), (8, 3, 3, 1, 3, False), (24, 2, 2, 3, "auto", True)]


# --- the plain oracle ------------------------------------------------------------------------

def _softplus(x):
    return np.logaddexp(0.0, x)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def plain_mamba(sd: dict, x: np.ndarray) -> np.ndarray:
    """mamba-ssm's Mamba block, one token and one channel at a time, float64, from its
    documented math: in_proj to (x, z); causal depthwise conv + SiLU; x_proj to (dt, B, C);
    dt = softplus(dt_proj(dt)); h = exp(dt A) h + dt B x; y = C.h + D x; y *= SiLU(z); out_proj."""
    B_, T, _ = x.shape
    w_in = sd["in_proj.weight"]
    Di = w_in.shape[0] // 2
    K = sd["conv1d.weight"].shape[-1]
    N = sd["A_log"].shape[1]
    R = sd["dt_proj.weight"].shape[1]
    conv_b = sd.get("conv1d.bias", np.zeros(Di))
    A = -np.exp(sd["A_log"])
    out = np.zeros((B_, T, sd["out_proj.weight"].shape[0]))
    for b in range(B_):
        xz = x[b] @ w_in.T  # [T, 2Di]
        u, z = xz[:, :Di], xz[:, Di:]
        h = np.zeros((Di, N))
        for t in range(T):
            conv = conv_b.copy()
            for j in range(K):  # tap j sees the input K - 1 - j steps back
                s = t - (K - 1 - j)
                if s >= 0:
                    conv = conv + sd["conv1d.weight"][:, 0, j] * u[s]
            uc = _silu(conv)
            dbl = sd["x_proj.weight"] @ uc
            dt_low, Bt, Ct = dbl[:R], dbl[R:R + N], dbl[R + N:]
            dt = _softplus(sd["dt_proj.weight"] @ dt_low + sd["dt_proj.bias"])
            h = np.exp(dt[:, None] * A) * h + (dt * uc)[:, None] * Bt[None, :]
            y = h @ Ct + sd["D"] * uc
            out[b, t] = sd["out_proj.weight"] @ (y * _silu(z[t]))
    return out


def _synthetic_state_dict(rng, d_model, d_state, d_conv, expand, dt_rank, conv_bias):
    Di = expand * d_model
    R = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    sd = {
        "in_proj.weight": rng.normal(0, d_model ** -0.5, (2 * Di, d_model)),
        "conv1d.weight": rng.normal(0, 0.5, (Di, 1, d_conv)),
        "x_proj.weight": rng.normal(0, Di ** -0.5, (R + 2 * d_state, Di)),
        "dt_proj.weight": rng.normal(0, R ** -0.5, (Di, R)),
        "dt_proj.bias": rng.normal(-3.0, 1.0, (Di,)),
        "A_log": np.log(rng.uniform(0.5, 8.0, (Di, d_state))),
        "D": rng.uniform(0.5, 1.5, (Di,)),
        "out_proj.weight": rng.normal(0, Di ** -0.5, (d_model, Di)),
    }
    if conv_bias:
        sd["conv1d.bias"] = rng.normal(0, 0.3, (Di,))
    return sd


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("config", CONFIGS)
def test_mapping_matches_plain_mamba(config):
    d_model, d_state, d_conv, expand, dt_rank, conv_bias = config
    rng = np.random.default_rng(0)
    sd = _synthetic_state_dict(rng, *config)
    spec, params = from_mamba_ssm(sd, d_conv=d_conv)
    assert (spec.d_model, spec.d_state, spec.d_conv, spec.expand) == (d_model, d_state, d_conv,
                                                                      expand)
    assert spec.dt_rank_value == (math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank)
    x = rng.normal(size=(2, 13, d_model))
    y, _ = memcore.realize(spec, params=params)(x)
    assert _rel(y, plain_mamba(sd, x)) <= 1e-9


def test_source_arrays_are_copied():
    sd = _synthetic_state_dict(np.random.default_rng(1), *CONFIGS[0])
    _, params = from_mamba_ssm(sd)
    params["D"][:] = 0.0
    assert np.all(sd["D"] != 0.0)


def test_refuses_bad_state_dicts():
    base = _synthetic_state_dict(np.random.default_rng(2), *CONFIGS[0])
    with pytest.raises(ValueError, match=r"\['in_proj.bias', 'out_proj.bias'\].*bias=True"):
        from_mamba_ssm({**base, "in_proj.bias": np.zeros(64), "out_proj.bias": np.zeros(16)})
    sd = dict(base)
    del sd["A_log"]
    sd["norm.weight"] = np.ones(16)
    with pytest.raises(ValueError, match=r"missing \['A_log'\], unknown \['norm.weight'\]"):
        from_mamba_ssm(sd)
    with pytest.raises(ValueError, match="d_conv=3 was given but conv1d.weight has width 4"):
        from_mamba_ssm(base, d_conv=3)
    with pytest.raises(ValueError, match="x_proj.weight: expected shape"):
        from_mamba_ssm({**base, "x_proj.weight": np.zeros((5, 32))})
    with pytest.raises(ValueError, match="integer expand"):
        from_mamba_ssm({**base, "in_proj.weight": np.zeros((2 * 24, 16))})
    with pytest.raises(TypeError, match="mapping"):
        from_mamba_ssm([("D", np.ones(3))])


# --- mamba-ssm's own module -----------------------------------------------------------------

MAMBA_MISSING = ("mamba-ssm is not installed; on a CPU machine: MAMBA_SKIP_CUDA_BUILD=TRUE "
                 "MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm "
                 "einops")


@pytest.fixture(scope="module")
def mamba_ssm():
    """(selective_scan_ref, the mamba_simple module), imported without mamba-ssm's compiled
    CUDA extension and Triton kernels: its package __init__ imports both, so the packages are
    entered without running it, and the modules that need them are stubbed for the import."""
    found = importlib.util.find_spec("mamba_ssm")
    if found is None or not found.submodule_search_locations:
        pytest.skip(MAMBA_MISSING)
    pytest.importorskip("torch", reason="mamba-ssm needs torch")
    pytest.importorskip("einops", reason="mamba-ssm needs einops")
    root = list(found.submodule_search_locations)[0]
    ours = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.modules",
            "mamba_ssm.utils", "mamba_ssm.ops.triton.layer_norm", "selective_scan_cuda"]

    def touched(name):
        return name in ours or name.startswith("mamba_ssm.")

    before = {k: v for k, v in sys.modules.items() if touched(k)}
    try:
        for name in ours[:5]:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = pkg
        layer_norm = types.ModuleType(ours[5])  # Triton kernels; unused on the reference path
        layer_norm._layer_norm_fwd = layer_norm.RMSNorm = None
        layer_norm.layer_norm_fn = layer_norm.rms_norm_fn = None
        sys.modules[ours[5]] = layer_norm
        sys.modules[ours[6]] = types.ModuleType(ours[6])  # the compiled CUDA extension
        try:
            interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
            simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        except Exception as err:  # a mamba-ssm release with other compiled imports
            pytest.skip(f"mamba-ssm's Mamba module does not import without its compiled "
                        f"parts: {type(err).__name__}: {err}")
    finally:
        # Leave no stub or half-initialised mamba_ssm package behind for other tests.
        for name in [k for k in sys.modules if touched(k)]:
            del sys.modules[name]
        sys.modules.update(before)
    return interface.selective_scan_ref, simple


def _official(mamba_ssm, monkeypatch, config, dtype):
    import torch

    scan_ref, simple = mamba_ssm
    monkeypatch.setattr(simple, "selective_scan_fn", scan_ref)
    monkeypatch.setattr(simple, "causal_conv1d_fn", None)  # the CUDA conv, if installed
    d_model, d_state, d_conv, expand, dt_rank, conv_bias = config
    torch.manual_seed(0)
    m = simple.Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                     conv_bias=conv_bias, use_fast_path=False).to(dtype)
    with torch.no_grad():  # move D and A away from their structured initial values
        m.D.uniform_(0.5, 1.5)
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
    return m.eval()


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_mamba_ssm_float64(mamba_ssm, monkeypatch, config):
    import torch

    m = _official(mamba_ssm, monkeypatch, config, torch.float64)
    # mamba-ssm's .float() calls upcast half-precision inputs to float32; here they keep float64
    # at float64 (memcore's rule), so mamba-ssm's own arithmetic runs in float64.
    plain_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda t, *a, **k: t if t.dtype == torch.float64 else
                        plain_float(t, *a, **k))
    spec, params = from_mamba_ssm(m.state_dict())
    x = torch.randn(2, 13, config[0], dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
        got, _ = memcore.realize(spec, backend="reference", params=params)(x)
    assert want.dtype == got.dtype == torch.float64
    assert _rel(got, want) <= 1e-9


def test_matches_mamba_ssm_float32(mamba_ssm, monkeypatch):
    import torch

    m = _official(mamba_ssm, monkeypatch, CONFIGS[0], torch.float32)
    spec, params = from_mamba_ssm(m.state_dict())
    assert params["in_proj.weight"].dtype == np.float32
    x = torch.randn(2, 13, CONFIGS[0][0])
    with torch.no_grad():
        want = m(x)
        got, _ = memcore.realize(spec, backend="reference", params=params)(x)
    assert got.dtype == torch.float32
    assert _rel(got, want) <= 1e-5  # DESIGN 6: float32 relative RMSE
