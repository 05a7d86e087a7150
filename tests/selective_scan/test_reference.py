"""The reference selective scan (DESIGN 2.1): a plain loop, mamba-ssm's own reference, the
streaming form folded over time, ``memcore.ops`` on numpy arrays, and argument errors."""

from __future__ import annotations

import numpy as np
import plain
import pytest
from hypothesis import given
from memcore.spec.reference import selective_scan as R
from refcheck import assert_close, scan_cases

from memcore import ops


@given(case=scan_cases())
def test_selective_scan_op_numpy_is_reference_and_fold_of_update(case):
    args, opt, h0 = case
    y, hT = ops.selective_scan(*args, **opt, initial_state=h0, return_final_state=True)
    ry, rh = R.selective_scan(*args, **opt, initial_state=h0, return_final_state=True)
    assert np.array_equal(y, ry) and np.array_equal(hT, rh)
    u, delta, A, Bm, Cm = args
    Bt, Dc, T = u.shape
    h = np.zeros((Bt, Dc, A.shape[1])) if h0 is None else h0
    ys = []
    for t in range(T):
        step_opt = dict(opt, z=None if opt["z"] is None else opt["z"][..., t])
        y_t, h = ops.selective_state_update(h, u[..., t], delta[..., t], A, Bm[..., t],
                                            Cm[..., t], **step_opt)
        ys.append(y_t)
    assert_close(np.stack(ys, axis=-1), y, "y (fold of selective_state_update)")
    assert_close(h, hT, "final state (fold of selective_state_update)")


@given(case=scan_cases())
def test_selective_scan_is_a_plain_loop(case):
    args, opt, h0 = case
    y, hT = R.selective_scan(*args, **opt, initial_state=h0, return_final_state=True)
    want_y, want_h = plain.selective_scan(*args, **opt, h0=h0)
    assert_close(y, want_y, "y (selective_scan vs loop)")
    assert_close(hT, want_h, "final state (selective_scan vs loop)")
    assert_close(R.selective_scan(*args, **opt, initial_state=h0), want_y,
                 "y without return_final_state")


def _mamba_ssm_selective_scan_ref():
    """mamba-ssm's pure-torch ``selective_scan_ref``. Its module imports the CUDA extension at
    the top and the package imports modules with heavy dependencies, neither of which the ref
    needs: load the one module with a placeholder extension, and undo it afterwards."""
    import importlib
    import importlib.util
    import sys
    import types

    try:
        found = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError):
        found = None
    if found is None:
        pytest.skip("mamba_ssm is not installed; the plain loop above stands in for its ref")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in (
        "mamba_ssm", "selective_scan_cuda")}
    try:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(found.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        return mod.selective_scan_ref
    except Exception as err:  # any import failure means the ref cannot run here
        pytest.skip(f"mamba_ssm's selective_scan_ref cannot be imported: {err!r}")
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ("mamba_ssm",
                                                                 "selective_scan_cuda")]:
            del sys.modules[k]
        sys.modules.update(saved)


@given(case=scan_cases())
def test_selective_scan_matches_mamba_ssm_reference(case):
    """mamba-ssm's ref computes in float32 whatever the input, so the bound is DESIGN's float32
    one (relative RMSE <= 1e-5) and not the float64 one."""
    torch = pytest.importorskip("torch", reason="torch is needed for mamba-ssm's reference")
    selective_scan_ref = _mamba_ssm_selective_scan_ref()
    (u, delta, A, Bm, Cm), opt, h0 = case
    if h0 is not None:
        h0 = None  # mamba-ssm has no initial state
    t = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in opt.items()}
    args = [torch.from_numpy(a).float() for a in (u, delta, A, Bm, Cm)]
    t = {k: (v.float() if hasattr(v, "float") else v) for k, v in t.items()}
    want, want_h = selective_scan_ref(*args, **t, return_last_state=True)
    y, h = R.selective_scan(*args, **t, return_final_state=True)
    for got, ref, what in ((y, want, "y"), (h, want_h, "final state")):
        g, r = got.double(), ref.double()
        rmse = float(torch.sqrt(torch.mean((g - r) ** 2)) / torch.sqrt(torch.mean(r ** 2)))
        assert rmse <= 1e-5, f"{what} vs mamba-ssm selective_scan_ref: relative RMSE {rmse:.2e}"


def test_selective_scan_argument_errors():
    u = np.zeros((1, 4, 5))
    A = -np.ones((4, 2))
    Bm = np.zeros((1, 2, 5))
    with pytest.raises(ValueError, match=r"selective_scan: delta must have u's shape"):
        R.selective_scan(u, np.zeros((1, 4, 4)), A, Bm, Bm)
    with pytest.raises(ValueError, match=r"selective_scan: A must be \[channels=4, d_state\]"):
        R.selective_scan(u, u, -np.ones((3, 2)), Bm, Bm)
    with pytest.raises(ValueError, match=r"selective_scan: C must be \[batch=1, d_state=2, T\]"):
        R.selective_scan(u, u, A, Bm, np.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match=r"B must be .*groups dividing 4"):
        R.selective_scan(u, u, A, np.zeros((1, 3, 2, 5)), Bm)
    with pytest.raises(ValueError, match=r"D must be \[channels=4\]"):
        R.selective_scan(u, u, A, Bm, Bm, D=np.zeros(3))
    with pytest.raises(ValueError, match=r"initial_state must be \[batch=1, channels=4, "
                                         r"d_state=2\]"):
        R.selective_scan(u, u, A, Bm, Bm, initial_state=np.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match=r"selective_state_update: u must be"):
        R.selective_state_update(np.zeros((1, 4, 2)), u, u, A, Bm, Bm)
