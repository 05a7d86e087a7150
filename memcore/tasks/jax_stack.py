"""The tasks' models on the JAX backend:

- a language model is the model spec realized by ``memcore.realize(spec, backend="jax",
  params=memcore.init(spec, seed))`` (``memcore.tasks.stack.task_model``), used through the
  functions below: ``logits_aux`` (the head at selected positions only), ``check_inputs``,
  ``state_dict`` and ``load_state_dict`` (under the torch ``TaskModel``'s names, so a torch
  state_dict loads here unchanged and the checkpoints of both backends name tensors alike);
- ``JaxMoonsMemory``: ``memcore.tasks.moons_model.MoonsMemory``'s twin.

``positions`` (flat indices into [B * T]) selects the rows whose logits are computed, as the
torch ``TaskModel``'s boolean mask does: a fixed-length index array keeps the traced shapes
static under ``jit``.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
PREFIX = "model."  # the torch TaskModel's name for the realized model


def _f32(a):
    return jnp.asarray(np.asarray(a, dtype=np.float32))


def _is_lm(model) -> bool:
    return hasattr(model, "params") and hasattr(model, "forward_aux")


def logits_aux(model, tokens, positions=None):
    """A JAX model realization on tokens [B, T]: (logits [B, T, V], or [n, V] at the flat
    ``positions`` [n]; the summed bmojo innovation loss or None)."""
    logits, _, aux = model.forward_aux(tokens, positions=positions)
    return logits, aux


def check_inputs(model, tokens) -> None:
    """Concrete token ids [B, T] in [0, vocab_size), checked before a jitted step (inside it
    the values are not known)."""
    t = np.asarray(tokens)
    if t.ndim != 2:
        raise ValueError(f"tokens must be a [batch, T] array of ids, got shape {t.shape}")
    V = model.spec.vocab_size
    if t.size and (t.min() < 0 or t.max() >= V):
        raise ValueError(f"tokens must lie in [0, vocab_size={V}), got values from "
                         f"{int(t.min())} to {int(t.max())}")


def state_dict(model) -> dict:
    """numpy arrays under the torch twin's state_dict names (``TaskModel``: ``model.<memcore
    name>``; ``MoonsMemory``: its own)."""
    if not _is_lm(model):
        return model.state_dict()
    return {PREFIX + k: np.asarray(v) for k, v in model.params.items()}


def load_state_dict(model, sd: dict):
    """A copy of ``model`` holding ``sd``'s values (torch names; numpy arrays or tensors)."""
    if not _is_lm(model):
        return model.load_state_dict(sd)
    sd = _check_names(state_dict(model), sd)
    return eqx.tree_at(lambda m: m.params, model,
                       {k[len(PREFIX):]: v for k, v in sd.items()})


def _check_names(own: dict, sd: dict) -> dict:
    if set(own) != set(sd):
        diff = sorted(set(own) ^ set(sd))
        raise ValueError(f"load_state_dict: the parameter names differ from the model's: "
                         f"{diff[:5]}{' ...' if len(diff) > 5 else ''}")
    out = {}
    for k, v in sd.items():
        a = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        if a.shape != own[k].shape:
            raise ValueError(f"load_state_dict: {k} has shape {a.shape}, expected "
                             f"{own[k].shape}")
        out[k] = jnp.asarray(a.astype(own[k].dtype))
    return out


class JaxComplexLinear(eqx.Module):
    """``moons_model.ComplexLinear``'s twin: C^a -> C^b on (re, im) pairs."""

    re: jax.Array
    im: jax.Array

    def __call__(self, x):
        xr, xi = x[..., 0::2], x[..., 1::2]
        yr = xr @ self.re.T - xi @ self.im.T
        yi = xr @ self.im.T + xi @ self.re.T
        return jnp.stack([yr, yi], axis=-1).reshape(*x.shape[:-1], -1)


class JaxMoonsMemory(eqx.Module):
    """``moons_model.MoonsMemory``'s twin: one contextual memory layer on x [B, T, 6]."""

    phi: JaxComplexLinear
    psi: JaxComplexLinear
    out: JaxComplexLinear
    heads: int = eqx.field(static=True)
    beta: float = eqx.field(static=True)

    def __init__(self, heads: int, seed: int = 0, beta: float = 50.0):
        from memcore.tasks.moons_model import initial_weights

        if heads not in (1, 3):
            raise ValueError(f"moons: heads must be 1 or 3 (3 complex dims in all), got {heads}")
        w = initial_weights(seed)  # the torch module's: both backends start equal
        self.phi, self.psi, self.out = (JaxComplexLinear(_f32(w[f"{m}.re"]), _f32(w[f"{m}.im"]))
                                        for m in ("phi", "psi", "out"))
        self.heads = heads
        self.beta = float(beta)

    def __call__(self, x):
        from memcore.backends.jax.associative_readout import associative_readout

        B, T, _ = x.shape
        E = 6 // self.heads
        k = self.phi(x).reshape(B, T, self.heads, E) * math.sqrt(self.beta)
        # v_j = W_psi x_{j+1}; the last position has no successor and is never read (j < t).
        v = self.psi(jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], 1))
        y = associative_readout(k, v.reshape(B, T, self.heads, E))
        return self.out(y.reshape(B, T, 6))

    def state_dict(self) -> dict:
        return {f"{m}.{p}": np.asarray(getattr(getattr(self, m), p))
                for m in ("phi", "psi", "out") for p in ("re", "im")}

    def load_state_dict(self, sd: dict) -> JaxMoonsMemory:
        sd = _check_names(self.state_dict(), sd)
        return eqx.tree_at(lambda s: (s.phi, s.psi, s.out), self,
                           tuple(JaxComplexLinear(sd[f"{m}.re"], sd[f"{m}.im"])
                                 for m in ("phi", "psi", "out")))


def n_params(model: eqx.Module) -> int:
    return int(sum(a.size for a in jax.tree_util.tree_leaves(eqx.filter(model,
                                                                        eqx.is_inexact_array))))


def pad_positions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Flat indices of ``mask`` [B, T], padded to a power of two (at most B * T) so that few
    shapes are compiled; returns (positions, weights: 1 real / 0 padding, n real)."""
    idx = np.flatnonzero(np.asarray(mask))
    n = len(idx)
    size = min(mask.size, 1 << max(0, (n - 1).bit_length()))
    pos = np.zeros(size, dtype=np.int32)
    pos[:n] = idx
    w = np.zeros(size, dtype=np.float32)
    w[:n] = 1.0
    return pos, w, n


@eqx.filter_jit
def _forward(model, inputs, positions):
    return logits_aux(model, inputs, positions)[0]


def logits_at(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits (numpy) at the True positions of ``mask`` ([n, V], row-major), or everywhere;
    one compiled forward per shape."""
    tokens = jnp.asarray(tokens)
    if mask is None:
        return np.asarray(_forward(model, tokens, None))
    pos, _, n = pad_positions(mask)
    return np.asarray(_forward(model, tokens, jnp.asarray(pos)))[:n]


@eqx.filter_jit
def extend_sequence(model, buf, t):
    """One autoregressive step on a continuous sequence buf [B, n, F] (a causal model): the
    output at position ``t`` (a traced index, so one compilation serves every t) is returned
    and written to position t + 1."""
    y = jax.lax.dynamic_index_in_dim(model(buf), t, axis=1, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(buf, y.astype(buf.dtype), t + 1, axis=1), y
