"""A small optax training loop for model realizations.

loss = next-token cross-entropy (optionally over masked targets only) + aux_weight * (sum of the
bmojo layers' innovation losses).
The innovation loss is what trains each bmojo layer's ``pred_proj`` (the predictor whose
errors pick the stored tokens); other models have no aux term.

    model = memcore.realize(spec, backend="jax")
    opt = optax.adam(1e-2)
    opt_state = init_opt(model, opt)
    model, opt_state, loss = train_step(model, opt_state, tokens, opt, aux_weight=0.1)
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .realize import JaxModel


def loss_fn(model: JaxModel, tokens, aux_weight: float = 0.0, mask=None):
    """Mean next-token cross-entropy over tokens [B, T] (T >= 2), plus the weighted aux loss.
    With a boolean ``mask`` [B, T - 1], only the targets where it is True count (e.g. the
    labelled positions of a recall task). Returns (total, (cross_entropy, aux))."""
    if not isinstance(model, JaxModel):
        raise TypeError(f"model must be a JAX model realization (JaxModel), got "
                        f"{type(model).__name__}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, T] with T >= 2 (inputs and next-token "
                         f"targets), got shape {tuple(tokens.shape)}")
    want = (tokens.shape[0], tokens.shape[1] - 1)
    if mask is not None and tuple(mask.shape) != want:
        raise ValueError(f"mask must be [batch, T - 1] = {list(want)} (one entry per target), "
                         f"got shape {tuple(mask.shape)}")
    logits, _, aux = model.call_aux(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if mask is None:
        ce = jnp.mean(nll)
    else:
        # A mask without any True entry gives 0 rather than 0 / 0.
        w = mask.astype(nll.dtype)
        ce = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    aux = jnp.zeros((), ce.dtype) if aux is None else aux
    return ce + aux_weight * aux, (ce, aux)


def init_opt(model: JaxModel, optimizer: optax.GradientTransformation):
    return optimizer.init(eqx.filter(model, eqx.is_inexact_array))


@functools.partial(eqx.filter_jit, donate="none")
def train_step(model: JaxModel, opt_state, tokens, optimizer: optax.GradientTransformation,
               aux_weight: float = 0.0, mask=None):
    """One optimizer step; returns (model, opt_state, loss, (cross_entropy, aux)).
    Pass ``aux_weight`` as a JAX scalar to change it without recompiling; ``mask`` as in
    ``loss_fn``."""
    (loss, parts), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, tokens,
                                                                            aux_weight, mask)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, loss, parts


def fit(model: JaxModel, batches, optimizer: optax.GradientTransformation,
        aux_weight: float = 0.0):
    """Run ``train_step`` over an iterable of token batches; returns (model, losses)."""
    opt_state = init_opt(model, optimizer)
    aux_weight = jnp.asarray(aux_weight, model.dtype)
    losses = []
    for tokens in batches:
        model, opt_state, loss, _ = train_step(model, opt_state, jnp.asarray(tokens), optimizer,
                                               aux_weight)
        losses.append(float(loss))
    return model, losses
