"""The tasks' models in JAX (equinox), twins of the torch ones:

- ``JaxTaskLM``: ``memcore.tasks.stack.TaskLM`` (embedding, optional short causal depthwise
  convolution before each mixer, the memcore mixers realized with ``backend="jax"``, tied head);
- ``JaxNextByte``: ``memcore.tasks.lm.NextByte`` around a JAX model realization;
- ``JaxMoonsMemory``: ``memcore.tasks.moons_model.MoonsMemory``.

Each has the same parameter names and, for the same seed, the same initial values as its torch
twin; ``state_dict()`` and ``load_state_dict()`` use the torch module's names, so a torch
state_dict loads here unchanged (and the checkpoints of both backends name tensors alike).

Every model is called as ``model(inputs, positions=None)``; ``positions`` (flat indices into
[B * T]) selects the rows whose logits are computed, as the torch stacks' boolean mask does:
a fixed-length index array keeps the traced shapes static under ``jit``.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import memcore
from memcore.backends.jax.numerics import layer_norm, rms_norm
from memcore.spec.model import Model
from memcore.tasks import model_args

F32 = jnp.float32


def _norm(kind: str, x, w):
    # The JAX model realization's norms, as the torch stack uses the torch realization's.
    return rms_norm(x, w) if kind == "rms" else layer_norm(x, w)


def _conv(x, w):
    # Causal depthwise: y_t = sum_k w[:, k] x_{t-K+1+k}; left zero padding (torch's conv1d).
    K, T = w.shape[1], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
    return sum(xp[:, k:k + T, :] * w[:, k] for k in range(K))


def _state_bytes(mixer, g):
    # run_blocks' mix for state_bytes: the mixer's output and its streaming state's bytes.
    y, state = mixer(g)
    ref = mixer.to_reference_state(state)
    return y, sum(_nbytes(a) for a in ref.values() if hasattr(a, "shape"))


def _f32(a):
    return jnp.asarray(np.asarray(a, dtype=np.float32))


def conv_init(d_model: int, width: int, seed: int, n: int) -> list:
    """The torch stack's convolution weights: U(-1/sqrt(K), 1/sqrt(K)) drawn from torch's
    generator seeded ``seed + 7919`` (drawn with torch so that both backends start equal)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed) + 7919)
    bound = 1.0 / math.sqrt(width)
    return [((torch.rand(d_model, width, generator=gen) * 2 - 1) * bound).numpy()
            for _ in range(n)]


def _check_tokens(tokens, vocab: int):
    """Token ids [B, T] in [0, vocab); values are checked only outside jit (concrete)."""
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"tokens must be a [batch, T] array of ids, got "
                         f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        t = np.asarray(tokens)
        model_args.check_token_range(int(t.min()), int(t.max()), vocab)


def _rows(h, positions):
    """h [B, T, D] -> h at flat ``positions`` [n] ([n, D]), or h unchanged."""
    if positions is None:
        return h
    return h.reshape(-1, h.shape[-1])[positions]


class JaxTaskLM(eqx.Module):
    """Token ids [B, T] -> logits, from a mixer-only model spec (see ``TaskLM``)."""

    embed: jax.Array
    norm_f: jax.Array
    norms: tuple
    mixers: tuple
    convs: tuple
    spec: Model = eqx.field(static=True)
    short_conv: int = eqx.field(static=True)

    def __init__(self, spec: Model, params: dict | None = None, seed: int = 0,
                 short_conv: int = 0):
        params = model_args.check_task_model("JaxTaskLM", spec, params, seed, short_conv)
        self.spec = spec
        self.short_conv = short_conv
        self.embed = _f32(params["embed.weight"])
        self.norm_f = _f32(params["norm_f.weight"])
        norms, mixers = [], []
        for i, layer in enumerate(spec.layers):
            pre = f"layers.{i}.mixer."
            sub = {n[len(pre):]: np.asarray(a, dtype=np.float32) for n, a in params.items()
                   if n.startswith(pre)}
            norms.append(_f32(params[f"layers.{i}.norm1.weight"]))
            mixers.append(memcore.realize(layer, backend="jax", params=sub))
        self.norms = tuple(norms)
        self.mixers = tuple(mixers)
        self.convs = tuple(_f32(w) for w in conv_init(spec.d_model, short_conv, seed,
                                                      len(spec.layers))) if short_conv else ()

    def check_inputs(self, tokens) -> None:
        _check_tokens(tokens, self.spec.vocab_size)

    def hidden_aux(self, tokens):
        """tokens [B, T] -> (final normed hidden states [B, T, D], the summed bmojo innovation
        loss or None)."""
        _check_tokens(tokens, self.spec.vocab_size)
        h, auxes = model_args.run_blocks(self, self.embed[tokens], _norm, _conv,
                                         model_args.forward_aux)
        return _norm(self.spec.norm, h, self.norm_f), model_args.sum_aux(auxes)

    def head(self, h):
        return (h @ self.embed.T) * self.spec.logit_scale

    def logits_aux(self, tokens, positions=None):
        h, aux = self.hidden_aux(tokens)
        return self.head(_rows(h, positions)), aux

    def __call__(self, tokens, positions=None):
        """Logits [B, T, V]; with flat ``positions`` [n], only those rows ([n, V])."""
        return self.logits_aux(tokens, positions)[0]

    def state_dict(self) -> dict:
        """numpy arrays under the torch ``TaskLM``'s state_dict names."""
        out = {"embed": self.embed, "norm_f": self.norm_f}
        for i, (n, m) in enumerate(zip(self.norms, self.mixers, strict=True)):
            out[f"norms.{i}"] = n
            out.update({f"mixers.{i}.{k}": v for k, v in m.params.items()})
        out.update({f"convs.{i}": w for i, w in enumerate(self.convs)})
        return {k: np.asarray(v) for k, v in out.items()}

    def load_state_dict(self, sd: dict) -> JaxTaskLM:
        """A copy holding ``sd``'s values (torch names; numpy arrays or torch tensors)."""
        sd = _check_names(self.state_dict(), sd)
        n = len(self.mixers)
        mixers = tuple(eqx.tree_at(lambda m: m.params, m, {k: sd[f"mixers.{i}.{k}"]
                                                            for k in m.params})
                       for i, m in enumerate(self.mixers))
        return eqx.tree_at(
            lambda s: (s.embed, s.norm_f, s.norms, s.mixers, s.convs), self,
            (sd["embed"], sd["norm_f"], tuple(sd[f"norms.{i}"] for i in range(n)), mixers,
             tuple(sd[f"convs.{i}"] for i in range(len(self.convs)))))

    def state_bytes(self, tokens) -> int:
        """Bytes of everything the model keeps to continue after ``tokens`` [1, T] (as
        ``TaskLM.state_bytes``): each mixer's streaming state plus the convolutions' last K-1
        inputs, at float32."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(f"state_bytes: tokens must be [1, T], got {tuple(tokens.shape)}")
        _, sizes = model_args.run_blocks(self, self.embed[tokens], _norm, _conv, _state_bytes)
        return int(sum(sizes) + model_args.conv_state_bytes(self))


def _nbytes(a) -> int:
    # Floats count at float32 (the stack's dtype), integer positions at their own width.
    a = np.asarray(a)
    return int(a.size) * (4 if np.issubdtype(a.dtype, np.floating) else a.itemsize)


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
        out[k] = jnp.asarray(a.astype(np.float32))
    return out


class JaxNextByte(eqx.Module):
    """A JAX model realization behind the loop's interface (``NextByte``'s twin)."""

    model: eqx.Module

    def __init__(self, spec: Model, params: dict | None = None, seed: int = 0):
        params = memcore.init(spec, seed) if params is None else params
        self.model = memcore.realize(spec, backend="jax",
                                     params={k: np.asarray(v, dtype=np.float32)
                                             for k, v in params.items()})

    @property
    def spec(self):
        return self.model.spec

    def check_inputs(self, tokens) -> None:
        _check_tokens(tokens, self.model.spec.vocab_size)

    def logits_aux(self, tokens, positions=None):
        logits, _, aux = self.model.forward_aux(tokens)
        if positions is not None:
            logits = logits.reshape(-1, logits.shape[-1])[positions]
        return logits, aux

    def __call__(self, tokens, positions=None):
        return self.logits_aux(tokens, positions)[0]

    def state_dict(self) -> dict:
        return {f"model.{k}": np.asarray(v) for k, v in self.model.params.items()}

    def load_state_dict(self, sd: dict) -> JaxNextByte:
        sd = _check_names(self.state_dict(), sd)
        return eqx.tree_at(lambda s: s.model.params, self,
                           {k[len("model."):]: v for k, v in sd.items()})


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
    return model(inputs, positions)


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
