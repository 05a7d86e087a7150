"""Shared pieces of the JAX backend's tests: fixed spec cases, float64 parameters, runners for
the reference and the JAX realizations, and comparisons of outputs and states."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import refcheck
from memcore.backends.jax.realize import realize
from memcore.spec.reference import layers as RL
from memcore.spec.reference import model as RM
from refcheck import is_model

from memcore import spec as S

F64_RTOL = 1e-9  # DESIGN 6: backend vs reference, float64
F32_RMSE = 1e-5  # DESIGN 6: backend vs reference, float32 relative RMSE

# One case per realization and per awkward corner; ids name the corner.
LAYER_CASES = {
    "transformer_full": S.transformer(6, 2, window=None),
    "transformer_window": S.transformer(6, 2, window=3),
    "transformer_norope_oddE": S.transformer(6, 2, window=4, positions="none"),
    "mamba": S.mamba(5, d_state=3, d_conv=3),
    "bmojo_f": S.bmojo_f(6, 2, window=3, d_state=2),
    "bmojo_f_untied_oddE": S.bmojo_f(3, 1, window=2, d_state=2, tie_fading=False),
    "bmojo": S.bmojo(6, 2, window=2, chunk=3, select=2, capacity=3, d_state=2),
    "bmojo_select_chunk": S.bmojo(4, 2, window=2, chunk=2, select=2, capacity=5, d_state=2),
    "bmojo_select0": S.bmojo(4, 2, window=2, chunk=3, select=0, capacity=2, d_state=2),
    "bmojo_capacity0": S.bmojo(4, 2, window=2, chunk=3, select=1, capacity=0, d_state=2),
    "bmojo_no_fading": S.bmojo(6, 3, window=3, chunk=4, select=1, capacity=2, fading=False),
    "mosaic": S.mosaic(6, 2),
    "mosaic_capacity": S.mosaic(6, 3, capacity=3),
    "persistent": S.persistent(6, 2, slots=4),
}


def normal_draws(seed: int = 0):
    """``draw(*shape)``: standard normal numpy arrays, one generator for a whole test file."""
    rng = np.random.default_rng(seed)
    return lambda *shape: rng.standard_normal(shape)


def as_jax(*arrays):
    """The arrays as JAX arrays, None kept."""
    return [None if a is None else jnp.asarray(a) for a in arrays]


def params64(spec, seed: int = 0, jitter: float = 0.1) -> dict:
    """refcheck's perturbed float64 parameters, from a perturbation stream of their own."""
    return refcheck.params64(spec, seed, jitter, offset=777)


def inputs(spec, B: int, T: int, seed: int = 0):
    """refcheck's inputs, with int32 tokens for a model spec."""
    return refcheck.inputs(spec, B, T, seed, tokens=np.int32)


def ref_forward(spec, params, x, state=None):
    """The reference's parallel form on numpy: (y, state, aux)."""
    fn = RM.forward_aux if is_model(spec) else RL.forward_aux
    return fn(spec, params, np.asarray(x), state)


def ref_fold(spec, params, x, state=None):
    """The reference's streaming form folded over time: (y, state)."""
    fn = RM.step_aux if is_model(spec) else RL.step_aux
    ys = []
    for t in range(x.shape[1]):
        y, state, _ = fn(spec, params, np.asarray(x)[:, t], state)
        ys.append(y)
    return np.stack(ys, axis=1), state


@eqx.filter_jit
def scan_steps(layer, x, state):
    """The JAX streaming form over all of x's time axis in one ``lax.scan``."""

    def body(st, x_t):
        y, st = layer.step(x_t, st)
        return st, y

    state, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), state


def rel_err(got, want) -> float:
    """max |got - want| / max |want|; inf on a shape mismatch or any NaN."""
    g, w = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        return float("inf")
    if g.size == 0:
        return 0.0
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(w))):
        return float("inf")
    diff = float(np.max(np.abs(g - w)))
    scale = float(np.max(np.abs(w)))
    return 0.0 if diff == 0.0 else (diff / scale if scale > 0 else float("inf"))


def rel_rmse(got, want) -> float:
    g, w = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if g.shape != w.shape or not np.all(np.isfinite(g)):
        return float("inf")
    den = float(np.sqrt(np.mean(w * w)))
    num = float(np.sqrt(np.mean((g - w) ** 2)))
    return 0.0 if num == 0.0 else (num / den if den > 0 else float("inf"))


def state_errors(got: dict, want: dict, path: str = "state") -> dict:
    """Relative error per array of two reference-format states (positions compared exactly)."""
    assert got["pos"] == want["pos"], f"{path}['pos']: {got['pos']} != {want['pos']}"
    assert got["spec_id"] == want["spec_id"], f"{path}['spec_id'] differs"
    assert set(got) == set(want), f"{path} keys {sorted(got)} != {sorted(want)}"
    out = {}
    for key in want:
        if key in ("pos", "spec_id"):
            continue
        if isinstance(want[key], tuple):
            assert len(got[key]) == len(want[key])
            for i, (g, w) in enumerate(zip(got[key], want[key], strict=True)):
                out.update(state_errors(g, w, f"{path}[{key!r}][{i}]"))
        elif key.endswith("pos"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]),
                                          err_msg=f"{path}[{key!r}]")
        else:
            out[f"{path}[{key!r}]"] = rel_err(got[key], want[key])
    return out


def assert_states_close(got: dict, want: dict, rtol: float = F64_RTOL):
    errs = state_errors(got, want)
    bad = {k: e for k, e in errs.items() if not e <= rtol}
    assert not bad, f"state arrays differ beyond {rtol}: {bad}"


def jax_layer(spec, params):
    return realize(spec, params)


def realized(spec):
    """(spec, its perturbed float64 parameters, the JAX realization on them)."""
    params = params64(spec)
    return spec, params, realize(spec, params)


def check_parallel_form(spec, params, layer, x):
    """The JAX parallel form on x against the reference's: a float64 output, the final state,
    and the aux loss (present in both or in neither). Returns the reference's (y, state)."""
    y_ref, s_ref, aux_ref = ref_forward(spec, params, x)
    y, state, aux = layer.forward_aux(jnp.asarray(x))
    assert y.dtype == jnp.float64
    assert rel_err(y, y_ref) <= F64_RTOL
    assert_states_close(layer.to_reference_state(state), s_ref)
    assert (aux is None) == (aux_ref is None)
    if aux is not None:
        assert rel_err(aux, aux_ref) <= F64_RTOL
    return y_ref, s_ref
