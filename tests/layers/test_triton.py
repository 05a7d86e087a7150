"""The torch backend's hot paths on the Triton kernels (MEMCORE_KERNELS=triton, interpreted on
the CPU) against the same layers on the torch path (MEMCORE_KERNELS=torch): outputs, final
states and gradients (input, parameters, initial state) of realized layers, in one call and
split over two calls; and proof that the kernels were the ones called."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.associative_readout as k_readout  # noqa: E402
import memcore.kernels.triton.eidetic_store as k_store  # noqa: E402
import memcore.kernels.triton.leaky_average as k_leaky  # noqa: E402
import memcore.kernels.triton.selective_scan as k_scan  # noqa: E402
import memcore.kernels.triton.windowed_readout as k_attention  # noqa: E402

import memcore  # noqa: E402
from memcore import spec as S  # noqa: E402
from memcore.testing import TOLERANCE, relative_error, relative_rmse  # noqa: E402

# Odd widths, d_state 3, windows and chunks that do not divide T: shapes the kernels tile badly.
CASES = {
    "mamba": S.mamba(6, d_state=3, d_conv=3),
    "transformer_window": S.transformer(6, 3, window=4),
    "bmojo": S.bmojo(6, 2, window=3, chunk=4, select=2, capacity=3, d_state=3),
    "bmojo_nofading": S.bmojo(5, 1, window=2, chunk=5, select=2, capacity=4, fading=False),
    "bmojo_f": S.bmojo_f(5, 1, window=2, d_state=2, tie_fading=False, expand=1),
    "mosaic": S.mosaic(6, 2, capacity=3),
    "mosaic_full": S.mosaic(5, 1),
    "persistent": S.persistent(6, 3, slots=4),
}
# Kernel calls of a first forward and a second one from its state; without a capacity the
# mosaic readout takes the kernel only on the first (a stored cache would be re-read). The
# bmojo store's per-chunk selection runs on the kernel of kernels/triton/eidetic_store.py.
KERNELS = {"mamba": {"scan": 2}, "transformer_window": {"attention": 2},
           "bmojo": {"scan": 2, "attention": 2, "store": 2},
           "bmojo_nofading": {"attention": 2, "store": 2},
           "bmojo_f": {"scan": 2, "attention": 2},
           "mosaic": {"leaky": 2, "readout": 2}, "mosaic_full": {"leaky": 2, "readout": 1},
           "persistent": {"leaky": 2}}
T = 7  # the split form runs ``split`` tokens, then the rest from the carried state


def _layer(spec, dtype, device="cpu"):
    params = memcore.init(spec, 0, dtype=np.float64)
    layer = memcore.realize(spec, backend="torch", params=params)
    return layer.to(device=device, dtype=dtype)


def _floats(state):
    """Floating-point arrays of a state, in key order."""
    return {k: v for k, v in sorted(state.items())
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _run(layer, x, split: int):
    """split 0: one call."""
    """(y, final state, the tensors gradients are taken to) of one forward or of two."""
    x = x.detach().clone().requires_grad_(True)
    wrt = [x, *layer.parameters()]
    if not split:
        y, state, aux = layer.forward_aux(x)
        return y, state, wrt, aux
    y1, s1, _ = layer.forward_aux(x[:, :split])
    # The carried state as a leaf, so its gradient is compared too.
    s1 = {k: (v.detach().clone().requires_grad_(True)
              if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in s1.items()}
    wrt += list(_floats(s1).values())
    y2, state, aux = layer.forward_aux(x[:, split:], s1)
    return torch.cat([y1, y2], 1), state, wrt, aux


def _results(layer, x, split):
    y, state, wrt, aux = _run(layer, x, split)
    g = torch.Generator().manual_seed(7)
    outs = {"y": y, **{"state." + k: v for k, v in _floats(state).items()}}
    loss = sum((v.double() * torch.randn(v.shape, generator=g, dtype=torch.float64).to(
        v.device)).sum()
               for v in outs.values())
    if aux is not None:
        loss = loss + 3.0 * aux.double()
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    outs.update({f"grad{i}": gr for i, gr in enumerate(grads) if gr is not None})
    return {k: v.detach() for k, v in outs.items()}


def _compare(name, dtype, split, monkeypatch, device):
    spec = CASES[name]
    layer = _layer(spec, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, spec.d_model, generator=g, dtype=torch.float64).to(device, dtype)
    monkeypatch.setenv("MEMCORE_KERNELS", "torch")
    want = _results(layer, x, split)
    monkeypatch.setenv("MEMCORE_KERNELS", "triton")
    got = _results(layer, x, split)
    assert set(got) == set(want)
    measure, tol = ((relative_error, TOLERANCE["float64"]) if dtype == torch.float64
                    else (relative_rmse, 1e-4))
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert got[key].dtype == want[key].dtype, key
        err = measure(got[key], want[key])
        assert err <= tol, f"{name} {key}: error {err:.3e} > {tol:.0e}"


# Split at 3: mosaic's ring (capacity 3) is not yet full on the second call; at 5 it is.
@pytest.mark.parametrize("split", [0, 3], ids=["parallel", "split"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_torch_path_float64(name, split, monkeypatch, device):
    _compare(name, torch.float64, split, monkeypatch, device)


@pytest.mark.parametrize("name", ["mamba", "transformer_window", "bmojo", "mosaic"])
def test_one_token_second_call_float64(name, monkeypatch, device):
    # T = 1 on the kernels, at a position inside a chunk and past a full window
    _compare(name, torch.float64, T - 1, monkeypatch, device)


@pytest.mark.parametrize("name", ["bmojo", "mosaic", "mosaic_full"])
def test_kernels_match_torch_path_float32(name, monkeypatch, device):
    _compare(name, torch.float32, 5, monkeypatch, device)


def _count(monkeypatch):
    """Wrap the kernel entries so that each call is counted."""
    calls = {"scan": 0, "leaky": 0, "readout": 0, "attention": 0, "store": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(k_scan, "selective_scan", counted("scan", k_scan.selective_scan))
    monkeypatch.setattr(k_leaky, "leaky_average", counted("leaky", k_leaky.leaky_average))
    monkeypatch.setattr(k_attention, "windowed_readout",
                        counted("attention", k_attention.windowed_readout))
    monkeypatch.setattr(k_readout, "associative_readout",
                        counted("readout", k_readout.associative_readout))
    monkeypatch.setattr(k_store, "innovation_select",
                        counted("store", k_store.innovation_select))
    return calls


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["triton", "torch", None])
def test_kernel_path_taken_only_when_chosen(name, mode, monkeypatch, device):
    calls = _count(monkeypatch)
    if mode is None:  # the device decides: CPU tensors take the torch path, CUDA the kernels
        monkeypatch.delenv("MEMCORE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MEMCORE_KERNELS", mode)
    spec = CASES[name]
    layer = _layer(spec, torch.float64, device)
    x = torch.randn(1, 5, spec.d_model, dtype=torch.float64, device=device)
    _, state = layer(x)
    layer(x[:, :2], state)
    for key in calls:
        on = mode == "triton" or (mode is None and device == "cuda")
        want = KERNELS[name].get(key, 0) if on else 0
        assert calls[key] == want, (name, mode, calls)


def test_streaming_step_stays_on_torch_path(monkeypatch):
    # One token per call: the step recurrences are cheaper than any kernel launch.
    calls = _count(monkeypatch)
    monkeypatch.setenv("MEMCORE_KERNELS", "triton")
    spec = CASES["bmojo"]
    layer = _layer(spec, torch.float64)
    state = None
    for _ in range(3):
        _, state = layer.step(torch.randn(2, spec.d_model, dtype=torch.float64), state)
    assert calls == {"scan": 0, "leaky": 0, "readout": 0, "attention": 0, "store": 0}


def test_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("MEMCORE_KERNELS", "cuda")
    layer = _layer(CASES["mamba"], torch.float64)
    with pytest.raises(ValueError, match="MEMCORE_KERNELS"):
        layer(torch.randn(1, 3, 6, dtype=torch.float64))
