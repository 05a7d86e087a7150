"""The torch backend's windowed readout on the Triton kernel (``implementation=``,
``MEMCORE_KERNELS``), split across calls through its state, and on the torch path: same outputs
and states as the reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")

import memcore.kernels.triton.windowed_readout as attn_mod  # noqa: E402
from kcheck import assert_close  # noqa: E402
from primitives import REF as ops  # noqa: E402
from primitives import TORCH as api  # noqa: E402
from tritoncheck import F64, take_path  # noqa: E402


@pytest.mark.parametrize("window,fading,split", [(4, True, 7), (4, True, 2), (3, False, 5),
                                                 (None, False, 6)])
def test_windowed_readout_split_through_state(window, fading, split, monkeypatch, device):
    """Kernels on both halves, the state passed between them in the reference's ring layout:
    same outputs and final state as one reference pass."""
    calls = take_path(monkeypatch, "triton", attn_mod, "windowed_readout")
    g = torch.Generator().manual_seed(2)
    B, T, H, E = 2, 15, 2, 3
    t = {n: torch.randn(B, T, H, E, generator=g, dtype=F64).to(device)
         for n in ("q", "k", "v", "fk", "fv")}

    def part(sl):
        kw = {"fading_k": t["fk"][:, sl], "fading_v": t["fv"][:, sl]} if fading else {}
        return (t["q"][:, sl], t["k"][:, sl], t["v"][:, sl]), kw

    (q, k, v), kw = part(slice(None))
    want, want_state = ops.windowed_readout(q, k, v, window, **kw, return_final_state=True)
    (q, k, v), kw = part(slice(0, split))
    # explicit: under auto, full causal attention (window None) stays on torch's SDPA
    o1, st = api.windowed_readout(q, k, v, window, **kw, return_final_state=True,
                                  implementation="triton")
    (q, k, v), kw = part(slice(split, None))
    o2, st = api.windowed_readout(q, k, v, window, **kw, initial_state=st,
                                  return_final_state=True, implementation="triton")
    assert len(calls) == 2
    assert_close("o", torch.cat([o1, o2], 1), want, F64)
    assert st["pos"] == want_state["pos"]
    for name in ("k", "v") + (("fk", "fv") if fading else ()):
        assert_close(f"state {name}", st[name], want_state[name], F64)


def test_windowed_readout_torch_path_takes_no_kernel(monkeypatch):
    calls = take_path(monkeypatch, "torch", attn_mod, "windowed_readout")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, 1, 4, generator=g, dtype=F64) for _ in range(3))
    o = api.windowed_readout(q, k, v, 2)
    assert calls == []
    assert_close("o", o, ops.windowed_readout(q, k, v, 2), F64)
