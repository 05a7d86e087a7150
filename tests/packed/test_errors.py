"""Bad ``cu_seqlens`` gives a ValueError naming it, in the reference and the torch backend:
wrong dtype, not 1-D, not starting at 0, not ending at T, decreasing or repeated (empty
documents are refused), batch other than 1, and a state passed with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refcheck import params64

import memcore
from tests.packed.packed_cases import BAD_CU_SEQLENS

SPEC = memcore.spec.bmojo(4, 2, window=2, chunk=3, select=1, capacity=2, d_state=2)
T = 6
BAD = BAD_CU_SEQLENS


def layers():
    params = params64(SPEC)
    return {"reference": memcore.realize(SPEC, backend="reference", params=params),
            "torch": memcore.realize(SPEC, backend="torch", params=params)}


def x_for(backend, B=1):
    x = np.random.default_rng(0).standard_normal((B, T, SPEC.d_model))
    return torch.from_numpy(x) if backend == "torch" else x


def cu_for(backend, cu):
    if backend == "torch" and isinstance(cu, np.ndarray):
        return torch.from_numpy(cu)
    return cu


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_cu_seqlens_is_named(backend, case):
    cu, words = BAD[case]
    layer = layers()[backend]
    with pytest.raises(ValueError, match="cu_seqlens") as e:
        layer(x_for(backend), cu_seqlens=cu_for(backend, cu))
    assert words in str(e.value)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_batch_other_than_one_is_refused(backend):
    layer = layers()[backend]
    with pytest.raises(ValueError, match="cu_seqlens.*batch 1"):
        layer(x_for(backend, B=2), cu_seqlens=cu_for(backend, np.array([0, 2, 6], np.int32)))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_state_with_cu_seqlens_is_refused(backend):
    layer = layers()[backend]
    x = x_for(backend)
    _, state = layer(x)
    with pytest.raises(ValueError, match="cu_seqlens.*state=None"):
        layer(x, state, cu_seqlens=cu_for(backend, np.array([0, 2, 6], np.int32)))


def test_model_refuses_bad_cu_seqlens():
    spec = memcore.spec.model([memcore.spec.mamba(4, d_state=2)], vocab_size=5)
    params = params64(spec)
    tokens = np.zeros((1, 4), np.int64)
    for backend, tok, cu in (("reference", tokens, np.array([0, 3], np.int32)),
                             ("torch", torch.from_numpy(tokens),
                              torch.tensor([0, 3], dtype=torch.int32))):
        model = memcore.realize(spec, backend=backend, params=params)
        with pytest.raises(ValueError, match="cu_seqlens must end at"):
            model(tok, cu_seqlens=cu)


def test_primitives_refuse_bad_cu_seqlens():
    from memcore.spec.reference.leaky_average import leaky_average
    from memcore.spec.reference.selective_scan import selective_scan

    k = np.zeros((1, 4, 1, 2))
    with pytest.raises(ValueError, match="leaky_average: cu_seqlens must have dtype int32"):
        leaky_average(k, np.zeros(1), cu_seqlens=np.array([0, 4]))
    u = np.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="selective_scan: cu_seqlens.*state=None"):
        selective_scan(u, u, -np.ones((2, 1)), np.zeros((1, 1, 4)), np.zeros((1, 1, 4)),
                       initial_state=np.zeros((1, 2, 1)), cu_seqlens=np.array([0, 4], np.int32))
