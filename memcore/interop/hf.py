"""transformers' own Mamba, Mistral and Jamba causal LMs as memcore model specs and params.

    model = transformers.AutoModelForCausalLM.from_pretrained(...)   # Mamba, Mistral or Jamba
    spec, params = memcore.interop.from_hf(model)
    lm = memcore.realize(spec, backend="torch", params=params)        # the same logits

The three are the special cases of DESIGN section 3 (a Mamba stack, a sliding-window
Transformer, a Jamba hybrid), checked here against the implementations people run.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from memcore.spec import Mamba, Model, Transformer
from memcore.spec.constants import ROPE_BASE
from memcore.spec.params import check_params

from .arrays import to_numpy

__all__ = ["from_hf"]


def _fail(cls: str, field: str, value, why: str) -> ValueError:
    return ValueError(f"from_hf: {cls} config.{field}={value!r} is not supported: {why}")


def _need(cls: str, config, field: str, want, why: str) -> None:
    value = getattr(config, field, want)
    if value != want:
        raise _fail(cls, field, value, why)


class _Params:
    """The model's state dict as numpy arrays, taken name by name (``take``), so that a tensor
    nothing maps (a bias, an expert, a module memcore lacks) is refused at the end."""

    def __init__(self, cls: str, model):
        self.cls = cls
        sd = model.state_dict()
        self.arrays = dict(sd.items())
        self.used: set[str] = set()
        self.out: dict[str, np.ndarray] = {}

    def take(self, src: str) -> np.ndarray:
        if src not in self.arrays:
            raise ValueError(f"from_hf: {self.cls} has no parameter {src!r}; expected the "
                             f"modules of transformers' {self.cls}")
        self.used.add(src)
        return to_numpy(src, self.arrays[src])

    def put(self, dst: str, src: str) -> None:
        self.out[dst] = self.take(src)

    def finish(self, spec: Model, model) -> tuple[Model, dict]:
        head = to_numpy("lm_head.weight", model.get_output_embeddings().weight)
        self.used.add("lm_head.weight")
        left = sorted(set(self.arrays) - self.used)
        if left:
            raise ValueError(f"from_hf: {self.cls} holds parameters memcore has no place for: "
                             f"{left[:8]}{' ...' if len(left) > 8 else ''}")
        # The head transformers runs is lm_head; tied to the embedding when the values agree.
        tied = np.array_equal(head, self.out["embed.weight"])
        if not tied:
            spec = dataclasses.replace(spec, tie_embeddings=False)
            self.out["lm_head.weight"] = head
        try:
            check_params(spec, self.out)
        except ValueError as err:
            raise ValueError(f"from_hf: {self.cls}'s shapes do not fit the mapped spec: "
                             f"{err}") from None
        return spec, self.out


def _silu(cls: str, config) -> None:
    _need(cls, config, "hidden_act", "silu",
          "memcore's Mamba convolution and SwiGLU FFN use SiLU")


def _mamba_block(cls: str, P: _Params, src: str, dst: str, D: int, d_inner: int, N: int,
                 K: int, R: int, conv_bias: bool, inner_norm_eps) -> Mamba:
    """One Mamba mixer (transformers' MambaMixer or JambaMambaMixer) under ``src``."""
    if d_inner % D:
        raise _fail(cls, "intermediate_size", d_inner,
                    f"d_inner must be a multiple of hidden_size={D} (memcore's expand is an int)")
    names = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight",
             "dt_proj.bias", "A_log", "D", "out_proj.weight"]
    if inner_norm_eps is not None:
        names += ["dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"]
    for n in names:
        P.put(dst + n, src + n)
    if conv_bias:
        P.put(dst + "conv1d.bias", src + "conv1d.bias")
    else:  # no bias is a zero bias
        P.out[dst + "conv1d.bias"] = np.zeros((d_inner,), P.out[dst + "conv1d.weight"].dtype)
    return Mamba(D, d_state=N, d_conv=K, expand=d_inner // D,
                 dt_rank="auto" if R == math.ceil(D / 16) else R, inner_norm_eps=inner_norm_eps)


def _heads(cls: str, config) -> tuple[int, int]:
    D, H = config.hidden_size, config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    if D % H:
        raise _fail(cls, "num_attention_heads", H, f"hidden_size={D} must be divisible by it")
    head_dim = getattr(config, "head_dim", None) or D // H
    if head_dim != D // H:
        raise _fail(cls, "head_dim", head_dim,
                    f"memcore's head width is hidden_size / num_attention_heads = {D // H}")
    if H % Hkv:
        raise _fail(cls, "num_key_value_heads", Hkv,
                    f"it must divide num_attention_heads={H}")
    return H, Hkv


def _attention(P: _Params, src: str, dst: str) -> None:
    for n in "qkvo":
        P.put(f"{dst}{n}_proj.weight", f"{src}{n}_proj.weight")


def _swiglu(P: _Params, src: str, dst: str) -> None:
    for n in ("gate_proj", "up_proj", "down_proj"):
        P.put(f"{dst}{n}.weight", f"{src}{n}.weight")


def _from_mamba(model) -> tuple[Model, dict]:
    cls, c = "MambaForCausalLM", model.config
    _silu(cls, c)
    _need(cls, c, "use_bias", False, "memcore's Mamba block has no in_proj/out_proj bias")
    P = _Params(cls, model)
    P.put("embed.weight", "backbone.embeddings.weight")
    D = c.hidden_size
    layers = []
    for i in range(c.num_hidden_layers):
        src, dst = f"backbone.layers.{i}.", f"layers.{i}."
        P.put(dst + "norm1.weight", src + "norm.weight")
        layers.append(_mamba_block(cls, P, src + "mixer.", dst + "mixer.", D,
                                   c.intermediate_size, c.state_size, c.conv_kernel,
                                   int(c.time_step_rank), bool(c.use_conv_bias), None))
    P.put("norm_f.weight", "backbone.norm_f.weight")
    V = P.out["embed.weight"].shape[0]
    return P.finish(Model(tuple(layers), V, None, "rms", norm_eps=c.layer_norm_epsilon), model)


def _rope_theta(cls: str, config) -> float:
    """The rotary base; only the default rotary embedding (no scaling) maps."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise _fail(cls, "rope_parameters['rope_type']", kind,
                    "memcore implements the default rotary embedding only (no scaling)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", ROPE_BASE))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _fail(cls, "rope_parameters['rope_theta']", theta, "it must be a number > 0")
    return float(theta)


def _from_mistral(model) -> tuple[Model, dict]:
    cls, c = "MistralForCausalLM", model.config
    _silu(cls, c)
    theta = _rope_theta(cls, c)
    H, Hkv = _heads(cls, c)
    W = getattr(c, "sliding_window", None)
    if W is not None and (isinstance(W, bool) or not isinstance(W, int) or W < 1):
        raise _fail(cls, "sliding_window", W, "it must be a positive int or None")
    P = _Params(cls, model)
    P.put("embed.weight", "model.embed_tokens.weight")
    layers = []
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        P.put(dst + "norm1.weight", src + "input_layernorm.weight")
        _attention(P, src + "self_attn.", dst + "mixer.")
        P.put(dst + "norm2.weight", src + "post_attention_layernorm.weight")
        _swiglu(P, src + "mlp.", dst + "ffn.")
        layers.append(Transformer(c.hidden_size, H, window=W, positions="rope", n_kv_heads=Hkv,
                                  rope_theta=theta))
    P.put("norm_f.weight", "model.norm.weight")
    V = P.out["embed.weight"].shape[0]
    spec = Model(tuple(layers), V, "swiglu", "rms", d_ff=c.intermediate_size,
                 norm_eps=c.rms_norm_eps)
    return P.finish(spec, model)


def _from_jamba(model) -> tuple[Model, dict]:
    cls, c = "JambaForCausalLM", model.config
    _silu(cls, c)
    experts = [i for i, n in enumerate(c.layers_num_experts) if n > 1]
    if experts:
        raise _fail(cls, "num_experts", c.num_experts,
                    f"layers {experts} are mixture-of-experts layers; memcore maps dense "
                    f"FFNs only (num_experts=1)")
    _need(cls, c, "mamba_proj_bias", False, "memcore's Mamba block has no in_proj/out_proj bias")
    H, Hkv = _heads(cls, c)
    D, eps = c.hidden_size, c.rms_norm_eps
    P = _Params(cls, model)
    P.put("embed.weight", "model.embed_tokens.weight")
    layers = []
    for i, kind in enumerate(c.layers_block_type):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        P.put(dst + "norm1.weight", src + "input_layernorm.weight")
        if kind == "mamba":
            layers.append(_mamba_block(cls, P, src + "mamba.", dst + "mixer.", D,
                                       c.mamba_expand * D, c.mamba_d_state, c.mamba_d_conv,
                                       int(c.mamba_dt_rank), bool(c.mamba_conv_bias), eps))
        elif kind == "attention":  # Jamba's attention has no positional encoding
            _attention(P, src + "self_attn.", dst + "mixer.")
            layers.append(Transformer(D, H, window=None, positions="none", n_kv_heads=Hkv))
        else:
            raise _fail(cls, "layers_block_type", kind, "expected 'mamba' or 'attention' layers")
        P.put(dst + "norm2.weight", src + "pre_ff_layernorm.weight")
        _swiglu(P, src + "feed_forward.", dst + "ffn.")
    P.put("norm_f.weight", "model.final_layernorm.weight")
    V = P.out["embed.weight"].shape[0]
    spec = Model(tuple(layers), V, "swiglu", "rms", d_ff=c.intermediate_size, norm_eps=eps)
    return P.finish(spec, model)


_MAPPERS = {"mamba": _from_mamba, "mistral": _from_mistral, "jamba": _from_jamba}


def from_hf(model) -> tuple[Model, dict]:
    """A transformers ``MambaForCausalLM``, ``MistralForCausalLM`` (with or without
    ``sliding_window``) or ``JambaForCausalLM`` (dense FFNs: ``num_experts=1``) as a memcore
    model spec and params (numpy arrays, copied; bfloat16 becomes float32), with the same
    logits as the model in eval mode (dropouts off).

    Mapping (memcore names on the left, ``memcore.spec.params``):

    - every model: ``embed.weight`` = the token embedding, ``layers.{i}.norm1/norm2.weight`` =
      the block's two RMSNorms (``norm_eps`` = ``rms_norm_eps``, Mamba's
      ``layer_norm_epsilon``), ``norm_f.weight`` = the final norm; the head is tied when
      ``lm_head.weight`` equals the embedding, else ``lm_head.weight``
      (``tie_embeddings=False``).
    - Mamba: one ``mamba`` mixer per block under mamba-ssm's names (``mixer.*`` 1:1), no FFN.
      ``use_conv_bias=False`` maps to a zero conv bias. ``residual_in_fp32`` changes nothing
      here (memcore's residual stream accumulates in float32 at least).
    - Mistral: a ``transformer`` mixer per block, ``n_kv_heads = num_key_value_heads``
      (grouped-query attention), rotary positions with ``rope_theta`` =
      ``rope_parameters['rope_theta']``; a ``swiglu`` FFN (``mlp.gate_proj``,
      ``up_proj``, ``down_proj``; ``d_ff = intermediate_size``).
    - Jamba: ``layers_block_type`` gives a ``mamba`` mixer (``mamba.*``, with Jamba's RMSNorms
      on dt, B and C: ``inner_norm_eps = rms_norm_eps``) or a ``transformer`` mixer with
      ``positions="none"`` (Jamba's attention has no positional encoding) and no window; a
      ``swiglu`` FFN in every block (``feed_forward.*``).

    Sliding window. transformers 5.x masks with ``sliding_window_overlay``: key ``kv_idx`` is
    visible to query ``q_idx`` when ``kv_idx > q_idx - sliding_window`` (and causal), so a
    query sees itself and the ``sliding_window - 1`` tokens before it: ``sliding_window``
    tokens. memcore's raw window (DESIGN 2.3) is ``t - W < j <= t``, also W tokens, so
    ``window = sliding_window`` exactly; ``sliding_window=None`` is full causal attention
    (``window=None``).

    Refused with a ValueError naming the config field: ``hidden_act`` other than "silu";
    Mamba ``use_bias=True`` and Jamba ``mamba_proj_bias=True`` (in_proj/out_proj biases);
    an ``intermediate_size`` (Jamba: ``mamba_expand``) that is not an integer multiple of
    ``hidden_size``; ``head_dim`` other than hidden_size / num_attention_heads;
    ``num_key_value_heads`` not dividing ``num_attention_heads``; a ``rope_type`` other than
    "default" (rope scaling); Jamba's
    mixture-of-experts layers (``num_experts`` > 1 on any layer). Any parameter left unmapped
    (a bias, an expert) is refused by name.
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    mapper = _MAPPERS.get(kind)
    if mapper is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"from_hf: model must be a transformers MambaForCausalLM, "
                        f"MistralForCausalLM or JambaForCausalLM, got {type(model).__name__} "
                        f"(model_type {kind!r})")
    if model.get_output_embeddings() is None:
        raise TypeError(f"from_hf: {type(model).__name__} has no output head (lm_head); pass "
                        f"the *ForCausalLM model")
    return mapper(model)
