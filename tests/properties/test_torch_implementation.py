"""The torch backend's primitive functions choose between the Triton kernels and the torch path
(``implementation=``, ``MEMCORE_KERNELS``): same results and states as the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

from memcore.backends.torch import implementation  # noqa: E402
from tritoncheck import F64  # noqa: E402


def test_kernels_enabled_follows_device_and_env(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv(implementation.ENV, raising=False)
    assert implementation.auto_kernel(x) is False  # a CPU tensor takes the torch path
    monkeypatch.setenv(implementation.ENV, "triton")
    assert implementation.auto_kernel(x) is True
    monkeypatch.setenv(implementation.ENV, "torch")
    assert implementation.auto_kernel(x) is False
    monkeypatch.setenv(implementation.ENV, "cuda")
    with pytest.raises(ValueError, match="MEMCORE_KERNELS must be one of"):
        implementation.auto_kernel(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_cuda_tensor_uses_kernels(monkeypatch):
    monkeypatch.delenv(implementation.ENV, raising=False)
    assert implementation.auto_kernel(torch.zeros(2, device="cuda")) is True


def test_explicit_choice_wins_over_the_environment(monkeypatch):
    import memcore.kernels.triton.leaky_average as k_leaky
    from memcore.backends.torch.leaky_average import leaky_average

    calls = []
    real = k_leaky.leaky_average
    monkeypatch.setattr(k_leaky, "leaky_average",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k, ld = torch.randn(1, 5, 2, 3, dtype=F64), -torch.rand(2, dtype=F64)
    monkeypatch.setenv(implementation.ENV, "triton")
    leaky_average(k, ld, implementation="torch")
    assert calls == []
    monkeypatch.setenv(implementation.ENV, "torch")
    if implementation.interpreted():
        leaky_average(k, ld, implementation="triton")
        assert calls == [1]


def test_explicit_choice_that_cannot_run_raises_with_the_reason(monkeypatch):
    from memcore.backends.torch.associative_readout import associative_readout, memory_readout
    from memcore.backends.torch.selective_scan import selective_scan

    k = torch.randn(1, 4, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match="implementation must be one of"):
        associative_readout(k, k, implementation="cuda")
    with pytest.raises(ValueError, match="implementation must be one of"):
        associative_readout(k, k, implementation="mamba_ssm")  # the scan's choice only
    mem = torch.randn(1, 2, 3, 3, dtype=F64)
    with pytest.raises(ValueError, match="without capacity after the first call"):
        memory_readout(k, mem, mem, 4, None, implementation="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        associative_readout(k, k, implementation="triton")
    import memcore.kernels.triton.selective_scan_mamba_ssm as mss

    monkeypatch.setattr(mss, "mamba_ssm_scan_fn", lambda: None)
    u = torch.randn(1, 2, 3)
    A, B = -torch.rand(2, 2), torch.randn(1, 2, 3)
    with pytest.raises(ImportError, match="implementation='mamba_ssm'"):
        selective_scan(u, u, A, B, B, implementation="mamba_ssm")
    monkeypatch.setattr(mss, "mamba_ssm_scan_fn", lambda: object())
    with pytest.raises(ValueError, match="no initial state"):
        selective_scan(u, u, A, B, B, initial_state=torch.ones(1, 2, 2),
                       implementation="mamba_ssm")
