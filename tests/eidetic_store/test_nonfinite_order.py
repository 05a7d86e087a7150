"""The store's total order with non-finite scores is the same in every tree: a NaN ranks above
every number (+inf included), NaNs and equal numbers tie, and a tie goes to the later position.
The reference, the torch backend, the Triton kernels (interpret mode on CPU) and the JAX backend
must pick the same positions in the same order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from memcore.backends.torch import eidetic_store as torch_store
from memcore.spec.reference import eidetic_store as ref_store

NAN, INF = math.nan, math.inf
# Per row: scores with every kind of tie; positions distinct, -1 marks an empty slot.
SCORES = [[NAN, INF, 1.0, NAN, -INF, INF, 1.0, 0.0],
          [1.0, NAN, -INF, 2.0, NAN, NAN, INF, -INF],
          [0.0, 0.0, NAN, INF, 5.0, NAN, -1.0, 3.0]]
POS = [[3, 9, 1, 7, 2, 4, 8, -1],
       [0, 5, 6, 2, -1, 11, 1, 3],
       [4, 6, 2, 10, -1, 8, 1, 0]]


def entries():
    g = np.random.default_rng(0)
    B, H, S, E = len(SCORES), 2, len(SCORES[0]), 3
    return {"k": g.standard_normal((B, H, S, E)), "v": g.standard_normal((B, H, S, E)),
            "score": np.array(SCORES, dtype=np.float64), "pos": np.array(POS, dtype=np.int64)}


def expected_positions(n: int) -> np.ndarray:
    """The order written out by hand from the rule, not by any tree's code."""
    def key(item):
        s, p = item
        return (0 if math.isnan(s) else 1, -s if not math.isnan(s) else 0.0, -p)

    rows = []
    for s_row, p_row in zip(SCORES, POS, strict=True):
        filled = sorted([(s, p) for s, p in zip(s_row, p_row, strict=True) if p >= 0], key=key)
        picked = [p for _, p in filled[:n]]
        rows.append(picked + [-1] * (n - len(picked)))
    return np.array(rows)


def as_torch(e: dict, device="cpu") -> dict:
    return {f: torch.as_tensor(a, device=device) for f, a in e.items()}


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_reference_order(n):
    got = ref_store.store_top(entries(), n)
    np.testing.assert_array_equal(got["pos"], expected_positions(n))


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_torch_order(n):
    got = torch_store.store_top(as_torch(entries()), n, implementation="torch")
    np.testing.assert_array_equal(got["pos"].numpy(), expected_positions(n))


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_triton_order(n, device):
    pytest.importorskip("triton", reason="the Triton kernels need triton")
    from memcore.kernels.triton.eidetic_store import store_top

    got = store_top(as_torch(entries(), device), n)
    np.testing.assert_array_equal(got["pos"].cpu().numpy(), expected_positions(n))


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_jax_order(n):
    pytest.importorskip("jax", reason="the JAX backend needs jax")
    import jax.numpy as jnp
    from memcore.backends.jax import eidetic_store as jax_store

    got = jax_store.store_top({f: jnp.asarray(a) for f, a in entries().items()}, n)  # x64: conftest
    np.testing.assert_array_equal(np.asarray(got["pos"]), expected_positions(n))


def test_merge_order_agrees():
    """A merge of two halves gives the same positions as the top of the whole, in every tree
    that runs on CPU without a kernel."""
    e = entries()
    a = {f: (x[:, :, :4] if f in ("k", "v") else x[:, :4]) for f, x in e.items()}
    b = {f: (x[:, :, 4:] if f in ("k", "v") else x[:, 4:]) for f, x in e.items()}
    want = expected_positions(5)
    np.testing.assert_array_equal(ref_store.store_merge(a, b, 5)["pos"], want)
    got = torch_store.store_merge(as_torch(a), as_torch(b), 5, implementation="torch")
    np.testing.assert_array_equal(got["pos"].numpy(), want)
