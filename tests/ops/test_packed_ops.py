"""``memcore.ops`` passes ``cu_seqlens`` through to every tree: on numpy arrays (the reference)
and torch tensors, a packed call equals the documents' separate calls, concatenated."""

import numpy as np
import pytest
import torch

from memcore import ops

CU = [0, 3, 4, 11]


def _docs(x, axis=1):
    return [x.take(range(a, b), axis=axis) for a, b in zip(CU[:-1], CU[1:], strict=True)]


def _cases(g):
    T, H, E, D, N = CU[-1], 2, 3, 4, 2
    k, v, q = (g.standard_normal((1, T, H, E)) for _ in range(3))
    u, delta = g.standard_normal((1, D, T)), g.standard_normal((1, D, T))
    A, Bm, Cm = -np.exp(g.standard_normal((D, N))), g.standard_normal((1, N, T)), \
        g.standard_normal((1, N, T))
    ld = -np.abs(g.standard_normal(H))
    return {
        "leaky_average": ((k, ld), {}, 1),
        "associative_readout": ((k, v), {}, 1),
        "windowed_readout": ((q, k, v), {"window": 2}, 1),
        "selective_scan": ((u, delta, A, Bm, Cm), {"delta_softplus": True}, 2),
    }


def _split_args(args, axis, name):
    if name == "selective_scan":  # u, delta, B, C carry time on axis 2; A does not
        u, delta, A, Bm, Cm = args
        return [(a, b, A, c, d) for a, b, c, d in
                zip(_docs(u, 2), _docs(delta, 2), _docs(Bm, 2), _docs(Cm, 2), strict=True)]
    if name == "leaky_average":
        k, ld = args
        return [(d, ld) for d in _docs(k, axis)]
    return list(zip(*(_docs(a, axis) for a in args), strict=True))


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["leaky_average", "associative_readout", "windowed_readout",
                                  "selective_scan"])
def test_packed_op_equals_separate_calls(name, library):
    args, kw, axis = _cases(np.random.default_rng(0))[name]
    conv = (lambda a: torch.as_tensor(a)) if library == "torch" else (lambda a: a)
    fn = getattr(ops, name)
    cu = conv(np.array(CU, dtype=np.int32))
    got = np.asarray(fn(*map(conv, args), **kw, cu_seqlens=cu))
    want = np.concatenate([np.asarray(fn(*map(conv, a), **kw))
                           for a in _split_args(args, axis, name)], axis=axis)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
