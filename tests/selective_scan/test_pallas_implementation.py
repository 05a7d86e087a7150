"""The seam of the JAX primitives: what ``implementation="auto"`` means (the device rule and the
MEMCORE_KERNELS override), and the selective scan on both implementations against the
reference."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
from memcore.backends.jax import implementation as impl  # noqa: E402
from memcore.backends.jax.selective_scan import selective_scan  # noqa: E402
from memcore.spec.reference import selective_scan as reference  # noqa: E402
from pallascheck import ON_GPU, rel_rmse  # noqa: E402


def test_device_rule(monkeypatch):
    monkeypatch.delenv(impl.ENV, raising=False)
    x = jnp.zeros(3)
    assert impl.auto_kernel(x) == ON_GPU
    assert not impl.auto_kernel(np.zeros(3))  # not a JAX array
    monkeypatch.setenv(impl.ENV, "pallas")
    assert impl.auto_kernel(x)
    monkeypatch.setenv(impl.ENV, "jax")
    assert not impl.auto_kernel(x)
    # inside jit the decision is made from the tracer, on the default backend
    monkeypatch.delenv(impl.ENV)
    assert bool(jax.jit(lambda a: jnp.asarray(impl.auto_kernel(a)))(x)) == ON_GPU
    monkeypatch.setenv(impl.ENV, "cuda")
    with pytest.raises(ValueError, match="MEMCORE_KERNELS must be one of"):
        impl.auto_kernel(x)


def test_selective_scan_both_paths(monkeypatch):
    r = np.random.default_rng(0)
    Bt, Dc, T, N = 1, 3, 10, 2
    x = dict(u=r.standard_normal((Bt, Dc, T)), delta=r.standard_normal((Bt, Dc, T)),
             A=-np.exp(r.standard_normal((Dc, N))), B=r.standard_normal((Bt, N, T)),
             C=r.standard_normal((Bt, N, T)), initial_state=r.standard_normal((Bt, Dc, N)))
    x = {k: jnp.asarray(a) for k, a in x.items()}
    y0, h0 = reference.selective_scan(**x, delta_softplus=True, return_final_state=True)
    for mode in ("pallas", "jax"):
        monkeypatch.setenv(impl.ENV, mode)  # what auto means
        y, h = selective_scan(**x, delta_softplus=True, return_final_state=True)
        assert rel_rmse(y, y0) <= 1e-9 and rel_rmse(h, h0) <= 1e-9, mode
        monkeypatch.setenv(impl.ENV, "jax" if mode == "pallas" else "pallas")
        y, h = selective_scan(**x, delta_softplus=True, return_final_state=True,
                              implementation=mode)  # the argument wins over the variable
        assert rel_rmse(y, y0) <= 1e-9 and rel_rmse(h, h0) <= 1e-9, mode
