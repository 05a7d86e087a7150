"""The JAX layers' kernel paths (MEMCORE_KERNELS=pallas, interpreted on the CPU) against the
same layers on the plain JAX path (MEMCORE_KERNELS=jax): outputs, final
states and gradients (input, parameters, the state carried between two calls) of realized
layers; the kernels' presence in the traced computation; and the streaming form after a
forward on the kernels."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas")
import jax.numpy as jnp  # noqa: E402
from memcore.backends.jax import implementation as impl  # noqa: E402
from memcore.backends.jax.associative_readout import associative_readout  # noqa: E402
from memcore.backends.jax.leaky_average import leaky_average  # noqa: E402
from memcore.backends.jax.state import State  # noqa: E402
from pallascheck import rel_rmse  # noqa: E402

import memcore  # noqa: E402
from memcore import spec as S  # noqa: E402

TOL = 1e-5  # float32, the same computation on two paths

# (spec, T, split): the differentiated call runs tokens split .. T - 1 from the state after
# the first split. Odd head widths (3, 5); calls not a multiple of the kernels' tiles (16) nor
# of the store chunk; bmojo_f starts at pos 3 < W = 8 (rings partly unfilled: key_start > 0),
# bmojo mid-chunk with a filled store.
CASES = {
    "mamba": (S.mamba(6, d_state=3, d_conv=3), 21, 13),
    "bmojo_f": (S.bmojo_f(5, 1, window=8, d_state=2, tie_fading=False, expand=1), 20, 3),
    "bmojo": (S.bmojo(6, 2, window=3, chunk=4, select=2, capacity=3, d_state=3), 19, 6),
}
# pallas_call sites in the traced forward and gradient of one call: the scan's forward and
# backward, the attention's forward, and its dq and per-source dk/dv kernels (with a
# store the attention's backward is the plain-JAX recomputation)
KERNELS = {"mamba": 2, "bmojo_f": 2 + 1 + 3, "bmojo": 2 + 1}


@pytest.fixture
def kernels(monkeypatch):
    def use(mode):
        monkeypatch.setenv("MEMCORE_KERNELS", mode)
    return use


def _layer(spec):
    return memcore.realize(spec, backend="jax", params=memcore.init(spec, 0, dtype=np.float32))


def _is_float(a):
    return jnp.issubdtype(a.dtype, jnp.floating)


def _from_state(layer, state):
    """(run, loss) of one call from ``state``, its float arrays given as ``floats`` so the
    gradient reaches the state (the kernels' initial scan state and caches)."""
    cls, spec = type(layer), layer.spec

    def run(params, x, floats):
        arrays = {**state.arrays, **floats}
        y, end = cls(params, spec)(x, State(state.pos, arrays, state.spec_id))
        return {"y": y, **{"state." + k: a for k, a in end.arrays.items() if _is_float(a)}}

    def loss(params, x, floats, weights):
        outs = run(params, x, floats)
        return sum(jnp.sum(outs[k] * weights[k]) for k in outs), outs

    return run, loss


def _inputs(spec, T):
    return jnp.asarray(np.random.default_rng(3).standard_normal((2, T, spec.d_model)),
                       jnp.float32)


def _flat(tree):
    return {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def _compile(fn, *args):
    # The checks compare two paths, not compiler output: XLA's cheapest CPU settings halve
    # the compile time that dominates this file.
    return jax.jit(fn).trace(*args).lower().compile(
        compiler_options={"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True})


@pytest.mark.parametrize("name", list(CASES))
def test_layer_on_kernels_matches_jax_path(name, kernels):
    spec, T, split = CASES[name]
    layer = _layer(spec)
    x = _inputs(spec, T)
    kernels("jax")
    # the state after ``split`` tokens: the differentiated call starts mid-stream (pos > 0)
    _, state = layer(x[:, :split])
    floats = {k: a for k, a in state.arrays.items() if _is_float(a)}
    x = x[:, split:]
    shapes = jax.eval_shape(_from_state(layer, state)[0], layer.params, x, floats)
    r = np.random.default_rng(5)
    weights = {k: jnp.asarray(r.standard_normal(s.shape), jnp.float32) for k, s in shapes.items()}
    results, sites = {}, {}
    for mode in ("jax", "pallas"):
        kernels(mode)
        # fresh functions per mode: JAX reuses a function's trace for the same input shapes
        grad = jax.grad(_from_state(layer, state)[1], argnums=(0, 1, 2), has_aux=True)
        args = (layer.params, x, floats, weights)
        sites[mode] = str(jax.make_jaxpr(grad)(*args)).count("pallas_call[")
        g, outs = _compile(grad, *args)(*args)
        results[mode] = _flat({**outs, **dict(zip(("dparams", "dx", "dstate"), g, strict=True))})
    # the routing is what is tested: the kernels appear in one trace and not in the other
    assert sites == {"jax": 0, "pallas": KERNELS[name]}
    assert results["jax"].keys() == results["pallas"].keys()
    errors = {k: rel_rmse(results["pallas"][k], results["jax"][k]) for k in results["jax"]}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{name}: {worst} relative RMSE {errors[worst]:.2e} > {TOL}"


@pytest.mark.parametrize("name", ["bmojo_f"])
def test_streaming_step_after_a_kernel_forward(name, kernels):
    # a first call from the empty state on the kernels (fewer tokens than W), then the step
    # form from its state (the scan state is the kernel's; the rings and a store are written by
    # the same JAX code on both paths)
    spec, T, split = CASES[name]
    layer = _layer(spec)
    x = _inputs(spec, T)
    outs = {}
    for mode in ("jax", "pallas"):
        kernels(mode)
        y, state = layer(x[:, :split])
        ys = [y]
        for t in range(split, split + 3):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t[:, None])
        outs[mode] = (jnp.concatenate(ys, axis=1), state)
    (y_j, s_j), (y_p, s_p) = outs["jax"], outs["pallas"]
    assert int(s_p.pos) == split + 3
    assert rel_rmse(y_p, y_j) <= TOL
    for k in s_j.arrays:
        assert rel_rmse(s_p.arrays[k], s_j.arrays[k]) <= TOL, k


def test_choice_is_checked_and_explicit(kernels):
    kernels("pallas")
    assert impl.resolve(jnp.zeros(3)) == "pallas"
    kernels("jax")
    assert impl.resolve(jnp.zeros(3)) == "jax"
    assert impl.choose("f", "pallas", jnp.zeros(3)) == "pallas"  # the argument wins
    with pytest.raises(ValueError, match="implementation must be one of"):
        impl.choose("f", "triton", jnp.zeros(3))
    # a primitive without a kernel runs JAX under auto (whatever the variable) and refuses an
    # explicit "pallas", saying why
    kernels("pallas")
    k = jnp.zeros((1, 3, 1, 2))
    leaky_average(k, jnp.zeros(1))
    with pytest.raises(ValueError, match="leaky_average: implementation='pallas' cannot run"
                                         " this call: it has no Pallas kernel"):
        leaky_average(k, jnp.zeros(1), implementation="pallas")
    with pytest.raises(ValueError, match="associative_readout: .*no Pallas kernel"):
        associative_readout(k, k, implementation="pallas")
    kernels("cuda")
    with pytest.raises(ValueError, match="MEMCORE_KERNELS must be one of"):
        impl.resolve(jnp.zeros(3))


def test_model_forward_routes_and_streaming_does_not(kernels):
    # traced only (no compilation): a model's parallel call holds the kernels exactly when
    # they are chosen, its one-token step never does
    spec = S.model([S.mamba(6, d_state=3, d_conv=3)], vocab_size=11)
    model = memcore.realize(spec, backend="jax", params=memcore.init(spec, 0, dtype=np.float32))
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    state = model.init_state(2)
    for mode, want in (("jax", 0), ("pallas", 1)):
        kernels(mode)

        def forward(params, tokens):
            return type(model)(params, spec)(tokens)[0]

        def step(params, tokens_t):
            return type(model)(params, spec).step(tokens_t, state)[0]

        assert str(jax.make_jaxpr(forward)(model.params, tokens)).count("pallas_call[") == want
        assert str(jax.make_jaxpr(step)(model.params, tokens[:, 0])).count("pallas_call[") == 0
