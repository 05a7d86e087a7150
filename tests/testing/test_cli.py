"""`memcore verify` and `memcore info`."""

from __future__ import annotations

import numpy as np
import pytest

from memcore import cli
from memcore.testing import verification as V


def test_verify_prints_a_table_and_exits_zero(capsys):
    code = cli.main(["verify", "--targets", "reference/numpy", "reference/torch",
                     "--cases", "bmojo", "mosaic"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all checks within tolerance" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("bmojo ", "mosaic "))]
    assert len(lines) == 4
    assert "worst error on reference/torch" in out


def test_verify_reports_a_failing_target(monkeypatch, capsys):
    real = V.realize_float64

    class Perturbed:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x, state=None):
            y, s = self.inner(x, state)
            return y * (1 + 1e-6), s

        def step(self, x_t, state=None):
            y, s = self.inner.step(x_t, state)
            return y * (1 + 1e-6), s

    def fake(spec, params, target):
        obj = real(spec, params, target)
        return Perturbed(obj) if target == "reference/torch" else obj

    monkeypatch.setattr(V, "realize_float64", fake)
    code = cli.main(["verify", "--targets", "reference/numpy", "reference/torch",
                     "--cases", "mamba"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "SOME CHECKS FAILED" in out


def test_verify_rejects_unknown_case(capsys):
    assert cli.main(["verify", "--cases", "nope"]) == 2
    assert "--cases" in capsys.readouterr().err


def test_verify_rejects_unknown_target():
    with pytest.raises(SystemExit):
        cli.main(["verify", "--targets", "cupy"])
    with pytest.raises(ValueError, match="targets"):
        V.verify(targets=["cupy"])


def test_as_backend_array_keeps_values_and_dtype():
    x = np.arange(6.0).reshape(2, 3)
    t = V.as_backend_array("reference/torch", x)
    assert str(t.dtype) == "torch.float64"
    assert np.array_equal(t.numpy(), x)


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "numpy" in out
