"""The optax loop learns a tiny synthetic task, and the aux weight trains the predictor."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from memcore.backends.jax.realize import realize
from memcore.backends.jax.train import fit, init_opt, train_step

from memcore import spec as S

SPEC = S.model([S.bmojo(8, 2, window=2, chunk=4, select=1, capacity=2, d_state=2)],
               vocab_size=6)
OPT = optax.adam(2e-2)  # one optimizer object: every test reuses one compiled train_step


def _batches(n, seed=0):
    """Counting sequences mod 6 from a random start: next token = token + 1."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 6, size=(8, 1)) + np.arange(13)[None]) % 6 for _ in range(n)]


def test_loss_decreases_on_counting_task():
    model = realize(SPEC, dtype=jnp.float32)
    model, losses = fit(model, _batches(30), OPT, aux_weight=0.1)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_aux_weight_trains_the_predictor_only_when_positive():
    model = realize(SPEC, dtype=jnp.float32)
    opt = OPT
    tokens = jnp.asarray(_batches(1, seed=1)[0])
    name = "layers.0.mixer.pred_proj.weight"
    before = np.asarray(model.params[name])
    off, _, _, (_, aux) = train_step(model, init_opt(model, opt), tokens, opt, jnp.float32(0.0))
    on, _, _, _ = train_step(model, init_opt(model, opt), tokens, opt, jnp.float32(1.0))
    assert float(aux) > 0
    np.testing.assert_array_equal(np.asarray(off.params[name]), before)
    assert np.max(np.abs(np.asarray(on.params[name]) - before)) > 1e-3  # adam moves by ~lr
