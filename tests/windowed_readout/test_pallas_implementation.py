"""The windowed readout through its seam on the kernel (a split call on
``implementation="pallas"`` equals one reference pass, states included), and the kernel's store
and key-cache options against its plain-JAX twin ``windowed_readout_ref``."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
from memcore.backends.jax.windowed_readout import windowed_readout  # noqa: E402
from memcore.kernels.pallas import windowed_readout as kernels  # noqa: E402
from memcore.spec.reference import windowed_readout as reference  # noqa: E402
from pallascheck import rel_rmse  # noqa: E402


def _paths(*args, **kw):
    """The kernel (interpreted off a GPU) and the plain-JAX twin on the same call."""
    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    return {"pallas": kernels.windowed_readout(*args, **kw, interpret=not on_gpu),
            "jax": kernels.windowed_readout_ref(*args, **kw)}


@pytest.mark.parametrize("window,fading,split", [(4, True, 3), (3, False, 7), (None, False, 5)])
def test_windowed_readout_split_through_kernel(window, fading, split):
    r = np.random.default_rng(1)
    q, k, v, fk, fv = (jnp.asarray(r.standard_normal((1, 13, 2, 3))) for _ in range(5))
    if not fading:
        fk = fv = None
    want, want_state = reference.windowed_readout(q, k, v, window, fk, fv,
                                                    return_final_state=True)

    def part(a, sl):
        return None if a is None else a[:, sl]

    first, last = slice(0, split), slice(split, None)
    o1, s = windowed_readout(*(part(a, first) for a in (q, k, v)), window, part(fk, first),
                             part(fv, first), return_final_state=True, implementation="pallas")
    o2, s = windowed_readout(*(part(a, last) for a in (q, k, v)), window, part(fk, last),
                             part(fv, last), initial_state=s, return_final_state=True,
                             implementation="pallas")
    assert rel_rmse(jnp.concatenate([o1, o2], axis=1), want) <= 1e-9
    assert s["pos"] == want_state["pos"]
    for name in set(want_state) - {"pos"}:
        assert rel_rmse(s[name], want_state[name]) <= 1e-9, name


def test_store_source_both_paths():
    r = np.random.default_rng(2)
    B, T, H, E, S, M = 1, 10, 1, 3, 3, 2
    q, k, v, fk, fv = (jnp.asarray(r.standard_normal((B, T, H, E))) for _ in range(5))
    sk, sv = (jnp.asarray(r.standard_normal((B, H, S, M, E))) for _ in range(2))
    spos = jnp.asarray([[[-1, -1], [0, 2], [3, 1]]])
    outs = _paths(q, k, v, 2, fk, fv, sk, sv, spos, chunk=4)
    assert rel_rmse(outs["pallas"], outs["jax"]) <= 1e-9
    # the store is seen: without it the result differs
    assert rel_rmse(kernels.windowed_readout_ref(q, k, v, 2, fk, fv), outs["jax"]) > 1e-3


def test_key_start_both_paths():
    # 4 queries after 6 cached keys at pos 3: the first 3 keys sit before position 0
    r = np.random.default_rng(3)
    q = jnp.asarray(r.standard_normal((1, 4, 1, 3)))
    k, v, fk, fv = (jnp.asarray(r.standard_normal((1, 10, 1, 3))) for _ in range(4))
    outs = _paths(q, k, v, 3, fk, fv, pos=3, key_start=3)
    assert rel_rmse(outs["pallas"], outs["jax"]) <= 1e-9
    cut = kernels.windowed_readout_ref(q, *(a[:, 3:] for a in (k, v)), 3,
                                       *(a[:, 3:] for a in (fk, fv)), pos=3)
    assert rel_rmse(outs["jax"], cut) <= 1e-9  # the same as the keys never given
    assert rel_rmse(kernels.windowed_readout_ref(q, k, v, 3, fk, fv, pos=3), outs["jax"]) > 1e-3
