"""``memcore.ops`` routes by the array library at call time: numpy to the reference's primitive
files, torch and JAX to their backend's primitive file wherever that defines the function."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from memcore import ops

NAMES = sorted(ops.PRIMITIVE_OF)


def test_ops_dispatch_numpy_to_the_reference():
    from memcore.spec.reference import selective_scan as R

    assert ops.route("selective_scan", "numpy") is R.selective_scan
    for name in NAMES:
        ref = getattr(importlib.import_module(f"memcore.spec.reference.{ops.PRIMITIVE_OF[name]}"),
                      name)
        assert ops.route(name, "numpy") is ref
        assert getattr(ops, name).__doc__ == ref.__doc__
        assert name in ops.__all__


@pytest.mark.parametrize("library", sorted(ops.BACKENDS))
@pytest.mark.parametrize("name", NAMES)
def test_a_function_a_backend_defines_is_the_one_routed(library, name):
    pytest.importorskip(library)
    path = f"{ops.BACKENDS[library]}.{ops.PRIMITIVE_OF[name]}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as err:
        if err.name is not None and path.startswith(err.name):
            pytest.skip(f"{path} does not exist")
        raise
    if not hasattr(module, name):
        pytest.skip(f"{path} does not define {name}")
    assert ops.route(name, library) is getattr(module, name)


def test_implementation_argument_on_the_reference():
    """The reference has one implementation: "auto" is accepted, any other choice is refused."""
    k = np.random.default_rng(0).standard_normal((1, 4, 2, 3))
    want = ops.associative_readout(k, k)
    assert np.array_equal(ops.associative_readout(k, k, implementation="auto"), want)
    with pytest.raises(ValueError, match=r"associative_readout: implementation='triton' is not "
                                         r"available"):
        ops.associative_readout(k, k, implementation="triton")


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match=r"unknown op 'flash_attention'"):
        ops.route("flash_attention", "numpy")
