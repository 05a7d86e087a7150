"""Model spec: token embedding, pre-norm residual blocks (mixer, then optional FFN), output head
(tied to the embedding by default)."""

from __future__ import annotations

from dataclasses import dataclass

from .arguments import bool_arg, choice_arg, float_arg, int_arg
from .base import Spec
from .constants import NORM_EPS
from .layers import LAYER_KINDS, Mamba, Persistent, Transformer, drop_defaults

NORMS = ("rms", "layer")
FFNS = ("mlp", "swiglu", "persistent", None)
DENSE_FFNS = ("mlp", "swiglu")


@dataclass(frozen=True)
class Model(Spec):
    """A stack of layer specs.

    ``ffn`` is "mlp" (GELU, fc1 then fc2), "swiglu" (down(silu(gate(x)) * up(x)), the FFN of
    Mistral, Llama and Jamba), a ``Persistent`` spec (Memory Mosaics), "persistent" (shorthand:
    heads of the first mixer that has heads, 3.5 d_model slots, the parameter-matching count of
    the Memory Mosaics paper), or None (mixer-only blocks, as Mamba and Zoology's MQAR models).
    The hidden width of "mlp" and "swiglu" is ``d_ff``, or ``mlp_ratio * d_model`` when d_ff is
    None.

    ``norm_eps``: the epsilon of every norm of the stack (x / sqrt(mean + eps)).
    ``tie_embeddings``: the head is the embedding (logits = h @ embed^T); False gives the model
    an output head of its own, ``lm_head.weight`` [vocab_size, d_model].
    ``short_conv``: K > 0 puts a short causal depthwise convolution of width K before each
    mixer, h = h + mixer(conv(norm1(h))) with conv(g)_t = sum_k w[:, k] g_{t-K+1+k} (zero
    before the first token; Zoology's and Based's hybrids); 0: none.
    """

    kind = "model"
    layers: tuple
    vocab_size: int
    ffn: str | Persistent | None = "mlp"
    norm: str = "rms"
    mlp_ratio: int = 4
    logit_scale: float = 1.0
    d_ff: int | None = None
    norm_eps: float = NORM_EPS
    tie_embeddings: bool = True
    short_conv: int = 0

    def _validate(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(f"model: layers must be a non-empty sequence of layer specs, "
                             f"got {self.layers!r}")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LAYER_KINDS):
                raise TypeError(f"model: layers[{i}] must be a layer spec "
                                f"({', '.join(c.kind for c in LAYER_KINDS)}), got {layer!r}")
            if layer.d_model != self.layers[0].d_model:
                raise ValueError(f"model: layers[{i}].d_model={layer.d_model} differs from "
                                 f"layers[0].d_model={self.layers[0].d_model}")
        int_arg("model", "vocab_size", self.vocab_size, minimum=1)
        int_arg("model", "mlp_ratio", self.mlp_ratio, minimum=1)
        choice_arg("model", "norm", self.norm, NORMS)
        float_arg("model", "logit_scale", self.logit_scale, positive=True)
        int_arg("model", "d_ff", self.d_ff, minimum=1, allow_none=True)
        float_arg("model", "norm_eps", self.norm_eps, positive=True)
        bool_arg("model", "tie_embeddings", self.tie_embeddings)
        int_arg("model", "short_conv", self.short_conv, minimum=0)
        if self.ffn == "persistent":
            heads = next((layer.n_heads for layer in self.layers if hasattr(layer, "n_heads")), 1)
            object.__setattr__(self, "ffn", Persistent(self.d_model, heads,
                                                       int(round(3.5 * self.d_model))))
        elif isinstance(self.ffn, Persistent):
            if self.ffn.d_model != self.d_model:
                raise ValueError(f"model: ffn.d_model={self.ffn.d_model} differs from the "
                                 f"layers' d_model={self.d_model}")
        elif self.ffn not in FFNS:
            raise ValueError(f"model: ffn must be 'mlp', 'swiglu', 'persistent', a Persistent "
                             f"spec or None, got {self.ffn!r}")
        if self.d_ff is not None and self.ffn not in DENSE_FFNS:
            raise ValueError(f"model: d_ff={self.d_ff} is the hidden width of an 'mlp' or "
                             f"'swiglu' FFN; this model's ffn is {self.ffn!r}")

    def to_dict(self):
        return drop_defaults(super().to_dict(), {"d_ff": None, "norm_eps": NORM_EPS,
                                                 "tie_embeddings": True, "short_conv": 0})

    @property
    def ffn_width(self) -> int:
        """The hidden width of an "mlp" or "swiglu" FFN."""
        return self.mlp_ratio * self.d_model if self.d_ff is None else self.d_ff

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def model(layers, vocab_size: int, ffn="mlp", norm: str = "rms", mlp_ratio: int = 4,
          logit_scale: float = 1.0, d_ff: int | None = None, norm_eps: float = NORM_EPS,
          tie_embeddings: bool = True, short_conv: int = 0) -> Model:
    return Model(tuple(layers) if isinstance(layers, list) else layers, vocab_size, ffn, norm,
                 mlp_ratio, logit_scale, d_ff, norm_eps, tie_embeddings, short_conv)


def jamba(d_model: int, n_heads: int, pattern: str = "MMMA", n_layers: int | None = None,
          vocab_size: int = 256, d_state: int = 16, window: int | None = None,
          positions: str = "rope", ffn="mlp", norm: str = "rms") -> Model:
    """A Jamba-style stack: ``pattern`` letters M (Mamba) and A (attention), repeated to
    ``n_layers`` (default: one pass of the pattern)."""
    if not isinstance(pattern, str) or not pattern or set(pattern) - {"M", "A"}:
        raise ValueError(f"jamba: pattern must be a non-empty string of 'M' and 'A', "
                         f"got {pattern!r}")
    n_layers = len(pattern) if n_layers is None else n_layers
    int_arg("jamba", "n_layers", n_layers, minimum=1)
    layers = []
    for i in range(n_layers):
        if pattern[i % len(pattern)] == "M":
            layers.append(Mamba(d_model, d_state=d_state))
        else:
            layers.append(Transformer(d_model, n_heads, window=window, positions=positions))
    return Model(tuple(layers), vocab_size, ffn, norm)


def has_aux(spec) -> bool:
    """Whether a layer spec, or a layer of a model spec, reports an aux loss (the innovation
    loss of an eidetic store); realized layers give 0 for it on an empty input."""
    layers = spec.layers if isinstance(spec, Model) else (spec,)
    return any(getattr(getattr(s, "readout", None), "store", None) is not None for s in layers)
