"""mamba-ssm's ``selective_scan_fn`` as the scan's optional GPU path (MEMCORE_SCAN), on the CPU.

mamba-ssm's pure-torch ``selective_scan_ref`` has the CUDA function's signature and results,
so it stands in for it: the routing must hand it every argument right (outputs, final state
and input gradients equal the torch backend's), take it only where it can serve the call (no
initial state, or an all-zero one without gradient; no float64), refuse a gradient through
the final state (which the CUDA backward drops), and raise when it is asked for by name but
missing. ``selective_scan_ref`` is imported from mamba-ssm's source without its compiled
parts, as tests/interop does; without mamba-ssm the tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the kernel path needs triton")

import memcore.kernels.triton.selective_scan as k_scan  # noqa: E402
import memcore.kernels.triton.selective_scan_mamba_ssm as mss  # noqa: E402
from kcheck import assert_close, rel_rmse  # noqa: E402
from memcore.backends.torch import implementation as choice  # noqa: E402
from memcore.backends.torch import selective_scan as api  # noqa: E402
from memcore.backends.torch import selective_scan as torch_scan  # noqa: E402

import memcore  # noqa: E402
from memcore import spec as S  # noqa: E402

MISSING = ("mamba-ssm is not installed (MAMBA_SKIP_CUDA_BUILD=TRUE pip install "
           "--no-build-isolation --no-deps mamba-ssm einops gives its pure-torch reference)")


@pytest.fixture(scope="module")
def scan_ref():
    """mamba-ssm's ``selective_scan_ref``, from its interface module loaded with stubs for the
    CUDA extension and the Triton layer norm it imports (nothing is left in sys.modules)."""
    found = importlib.util.find_spec("mamba_ssm")
    if found is None or not found.submodule_search_locations:
        pytest.skip(MISSING)
    pytest.importorskip("einops", reason="mamba-ssm's reference needs einops")
    root = list(found.submodule_search_locations)[0]
    stubs = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils",
             "mamba_ssm.ops.triton.layer_norm", "selective_scan_cuda"]
    before = {k: v for k, v in sys.modules.items()
              if k in stubs or k.startswith("mamba_ssm.")}
    try:
        for name in stubs[:4]:  # packages entered without running their __init__
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = pkg
        norm = types.ModuleType(stubs[4])
        norm._layer_norm_fwd = None
        sys.modules[stubs[4]] = norm
        sys.modules[stubs[5]] = types.ModuleType(stubs[5])
        path = os.path.join(root, "ops", "selective_scan_interface.py")
        spec = importlib.util.spec_from_file_location("_selective_scan_mamba_ssm_interface", path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except Exception as err:  # a mamba-ssm release with other compiled imports
            pytest.skip(f"mamba-ssm's selective_scan_interface does not import without its "
                        f"compiled parts: {type(err).__name__}: {err}")
    finally:
        for name in [k for k in sys.modules if k in stubs or k.startswith("mamba_ssm.")]:
            del sys.modules[name]
        sys.modules.update(before)
    return mod.selective_scan_ref


@pytest.fixture
def calls(scan_ref, monkeypatch):
    """Routes mamba-ssm's function to the reference, counting calls of it and of the Triton
    kernel; the kernels are forced on and mamba-ssm's path chosen."""
    counts = {"mamba_ssm": 0, "triton": 0}

    def ref(*args, **kwargs):
        counts["mamba_ssm"] += 1
        return scan_ref(*args, **kwargs)

    def triton_scan(*args, **kwargs):
        counts["triton"] += 1
        return triton_kernel(*args, **kwargs)

    triton_kernel = k_scan.selective_scan
    monkeypatch.setattr(mss, "mamba_ssm_scan_fn", lambda: ref)
    monkeypatch.setattr(k_scan, "selective_scan", triton_scan)
    monkeypatch.setenv("MEMCORE_KERNELS", "triton")
    monkeypatch.setenv("MEMCORE_SCAN", "mamba_ssm")
    return counts


def _inputs(device, dtype, groups=None, Bt=2, Dc=6, T=11, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dt)

    bc = (Bt, N, T) if groups is None else (Bt, groups, N, T)
    return dict(u=r(Bt, Dc, T), delta=r(Bt, Dc, T, scale=0.5),
                A=(-torch.rand(Dc, N, generator=g, dtype=torch.float64) - 0.3).to(device,
                                                                                  torch.float32),
                B=r(*bc), C=r(*bc), D=r(Dc, dt=torch.float32), z=r(Bt, Dc, T),
                delta_bias=r(Dc, scale=0.2, dt=torch.float32))


def _run(inp, options, monkeypatch, mode, wrt, initial_state=None):
    """(y, h_T, gradients of a loss on y to ``wrt``) through the torch backend's scan with
    MEMCORE_KERNELS = mode."""
    monkeypatch.setenv("MEMCORE_KERNELS", mode)
    leaves = {k: v.detach().clone().requires_grad_(k in wrt) for k, v in inp.items()}
    kw = {k: leaves[k] for k in ("D", "z", "delta_bias") if k in options}
    y, hT = torch_scan.selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"],
                                      leaves["C"], delta_softplus="softplus" in options,
                                      initial_state=initial_state, return_final_state=True,
                                      **kw)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device)
    grads = torch.autograd.grad((y.float() * cot).sum(), [leaves[k] for k in wrt])
    return y.detach(), hT.detach(), dict(zip(wrt, grads, strict=True))


OPTIONS = {
    "plain": (),
    "all": ("D", "z", "delta_bias", "softplus"),
    "D_softplus": ("D", "softplus"),
    "z_bias": ("z", "delta_bias"),
}


@pytest.mark.parametrize("groups", [None, 2], ids=["shared_BC", "grouped_BC"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_mamba_ssm_path_passes_every_argument(calls, monkeypatch, device, options, groups):
    opts = OPTIONS[options]
    inp = _inputs(device, torch.float32, groups)
    wrt = ["u", "delta", "A", "B", "C"] + [k for k in ("D", "z", "delta_bias") if k in opts]
    want = _run(inp, opts, monkeypatch, "torch", wrt)
    assert calls == {"mamba_ssm": 0, "triton": 0}
    got = _run(inp, opts, monkeypatch, "triton", wrt)
    assert calls == {"mamba_ssm": 1, "triton": 0}, calls
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
    assert_close("y", got[0], want[0], torch.float32)
    assert_close("final state", got[1], want[1], torch.float32)
    for k in wrt:
        assert got[2][k].shape == want[2][k].shape, k
        assert_close(f"d{k}", got[2][k], want[2][k], torch.float32)


def test_api_entry_routes_too(calls, device):
    # memcore.ops.selective_scan, the entry with the reference's signature
    inp = _inputs(device, torch.float32)
    y, hT = api.selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                               D=inp["D"], return_final_state=True)
    assert calls == {"mamba_ssm": 1, "triton": 0}, calls
    want_y, want_h = k_scan.selective_scan_ref(inp["u"], inp["delta"], inp["A"], inp["B"],
                                               inp["C"], D=inp["D"], return_final_state=True)
    assert_close("y", y, want_y, torch.float32)
    assert_close("final state", hT, want_h, torch.float32)


def test_argument_order_is_checked(calls, monkeypatch, device):
    # the comparison above must see a swapped argument: B and C exchanged differ in y
    inp = _inputs(device, torch.float32)
    y, _, _ = _run(inp, OPTIONS["all"], monkeypatch, "torch", ["u"])
    swapped = dict(inp, B=inp["C"], C=inp["B"])
    y_sw, _, _ = _run(swapped, OPTIONS["all"], monkeypatch, "triton", ["u"])
    assert rel_rmse(y_sw, y) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(calls, monkeypatch, device, dtype):
    inp = _inputs(device, dtype, T=9)
    want = _run(inp, OPTIONS["all"], monkeypatch, "torch", ["u", "B"])
    got = _run(inp, OPTIONS["all"], monkeypatch, "triton", ["u", "B"])
    assert calls["mamba_ssm"] == 1 and calls["triton"] == 0
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close("y", got[0], want[0], dtype)
    assert_close("final state", got[1], want[1], dtype)
    assert_close("du", got[2]["u"], want[2]["u"], dtype)


def test_initial_state_takes_the_triton_kernel(calls, monkeypatch, device):
    inp = _inputs(device, torch.float32)
    h0 = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(5)).to(device)
    want = _run(inp, OPTIONS["all"], monkeypatch, "torch", ["u"], initial_state=h0)
    got = _run(inp, OPTIONS["all"], monkeypatch, "triton", ["u"], initial_state=h0)
    assert calls == {"mamba_ssm": 0, "triton": 1}, calls
    assert_close("y", got[0], want[0], torch.float32)
    assert_close("final state", got[1], want[1], torch.float32)


def test_zero_initial_state(calls, monkeypatch, device):
    # all zeros and no gradient wanted: the same as none, so mamba-ssm's path serves it
    inp = _inputs(device, torch.float32)
    h0 = torch.zeros(2, 6, 3, device=device)
    _run(inp, (), monkeypatch, "triton", ["u"], initial_state=h0)
    assert calls == {"mamba_ssm": 1, "triton": 0}, calls
    # a gradient to the initial state is wanted: only the Triton kernel gives it
    _run(inp, (), monkeypatch, "triton", ["u"], initial_state=h0.clone().requires_grad_())
    assert calls == {"mamba_ssm": 1, "triton": 1}, calls


def test_float64_takes_the_triton_kernel(calls, monkeypatch, device):
    inp = _inputs(device, torch.float64)
    _run(inp, (), monkeypatch, "triton", ["u"])
    assert calls == {"mamba_ssm": 0, "triton": 1}, calls


def test_gradient_through_final_state_is_refused(calls, monkeypatch, device):
    inp = _inputs(device, torch.float32)
    u = inp["u"].clone().requires_grad_()
    y, hT = torch_scan.selective_scan(u, inp["delta"], inp["A"], inp["B"], inp["C"],
                                      return_final_state=True)
    assert calls["mamba_ssm"] == 1
    # a loss on y alone is fine; one on the final state would get a wrong (dropped) gradient
    torch.autograd.grad(y.sum(), u, retain_graph=True)
    with pytest.raises(RuntimeError, match="MEMCORE_SCAN=triton"):
        torch.autograd.grad(hT.sum(), u)


def test_mamba_layer_first_call_takes_it(calls, monkeypatch, device):
    # a layer's first call passes its zero initial state: mamba-ssm serves it; the second
    # call starts from a non-zero state: the Triton kernel
    spec = S.mamba(6, d_state=3, d_conv=3)
    layer = memcore.realize(spec, backend="torch",
                            params=memcore.init(spec, 0, dtype=np.float32)).to(device)
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(2)).to(device)
    outs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("MEMCORE_KERNELS", mode)
        y1, s1 = layer(x[:, :4])
        y2, s2 = layer(x[:, 4:], s1)
        outs[mode] = (y1, y2, s2["ssm"])
    assert calls == {"mamba_ssm": 1, "triton": 1}, calls
    for a, b, what in zip(outs["triton"], outs["torch"], ("y1", "y2", "state"), strict=True):
        assert_close(what, a.detach(), b.detach(), torch.float32)


def test_default_decides_when_unset(calls, monkeypatch, device):
    monkeypatch.delenv("MEMCORE_SCAN")
    u = torch.zeros(1, 2, 3, device=device)
    for default in ("triton", "mamba_ssm"):
        monkeypatch.setattr(choice, "DEFAULT_SCAN", default)
        assert choice.scan_path(u) == default


def test_missing_mamba_ssm(monkeypatch, device):
    monkeypatch.setattr(mss, "mamba_ssm_scan_fn", lambda: None)
    u = torch.zeros(1, 2, 3, device=device)
    monkeypatch.setenv("MEMCORE_SCAN", "mamba_ssm")
    with pytest.raises(ImportError, match="MEMCORE_SCAN=mamba_ssm"):
        choice.scan_path(u)
    # as the default it falls back to the kernel that serves every call
    monkeypatch.delenv("MEMCORE_SCAN")
    monkeypatch.setattr(choice, "DEFAULT_SCAN", "mamba_ssm")
    assert choice.scan_path(u) == "triton"


def test_bad_choice_is_named(monkeypatch, device):
    monkeypatch.setenv("MEMCORE_SCAN", "cuda")
    with pytest.raises(ValueError, match="MEMCORE_SCAN"):
        choice.scan_path(torch.zeros(1, 2, 3, device=device))
