"""Tiny random transformers models for the ``from_hf`` tests, their logits, and memcore's logits
on the mapped spec and params in each backend and form.

transformers runs parts of a float64 model in float32: its RMSNorms compute in float32
(``hidden_states.to(torch.float32)``), Mamba and Jamba take ``A_log.float()``, ``B.float()``
and return ``logits.float()``, eager attention's softmax uses ``dtype=torch.float32`` and the
rotary embedding builds ``inv_freq`` and the angles in float32. Its float64 logits are thus only
float32-accurate (about 1e-7 off here), so the float64 comparison runs transformers' code under
``keep_float64``: those casts keep float64 tensors float64 (and ``inv_freq`` is made in
float64 by the same formula). Nothing else changes, and ``test_*_float64_casts_only_round``
checks that the stock float64 run differs from it by float32 rounding only. float32 runs are
stock transformers.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers

import memcore

TOKENS = 13  # longer than the sliding window (5), so the window bites
BATCH = 2
VOCAB = 37
WINDOW = 5
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
BACKENDS = ("reference", "torch", "jax")
FORMS = ("parallel", "streaming")


def mamba_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                conv_kernel=4, time_step_rank=3)
    return transformers.MambaConfig(**{**base, **kw})


def mistral_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=4, sliding_window=None,
                initializer_range=0.2)
    return transformers.MistralConfig(**{**base, **kw})


def jamba_config(**kw):
    # layers: mamba, attention, mamba, attention (attn_layer_period 2, offset 1). Weights wider than
# the default initializer_range (0.02), so that logits are O(1) and a mapping error shows.
    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, num_experts=1,
                attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_dt_rank=3,
                mamba_expand=2, mamba_d_conv=4, initializer_range=0.2)
    return transformers.JambaConfig(**{**base, **kw})


CLASSES = {"mamba": transformers.MambaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "jamba": transformers.JambaForCausalLM}
CONFIGS = {"mamba": mamba_config, "mistral": mistral_config, "jamba": jamba_config}


def build(kind: str, dtype=torch.float64, seed: int = 0, **config):
    """A random ``kind`` causal LM in eval mode; its norm weights are drawn away from 1 so a
    norm mapped to the wrong place shows."""
    torch.manual_seed(seed)
    cfg = CONFIGS[kind](**config)
    model = CLASSES[kind](cfg).eval()
    with torch.no_grad():  # drawn in float32, then cast: the same model in either dtype
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model = model.to(dtype)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None and dtype == torch.float64:
        dim, theta = cfg.head_dim, cfg.rope_parameters["rope_theta"]
        rotary.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return model


def tokens(seed: int = 1, batch: int = BATCH, T: int = TOKENS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def keep_float64():
    """transformers' float32 casts (``.float()``, ``.to(torch.float32)``, softmax's
    ``dtype=torch.float32``) leave float64 tensors float64 inside the block."""
    orig_float, orig_to = torch.Tensor.float, torch.Tensor.to
    orig_softmax = torch.nn.functional.softmax

    def float_(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else orig_float(self, *args, **kwargs)

    def to(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return orig_to(self, *args, **kwargs)

    def softmax(x, *args, dtype=None, **kwargs):
        if x.dtype == torch.float64 and dtype is torch.float32:
            dtype = torch.float64
        return orig_softmax(x, *args, dtype=dtype, **kwargs)

    torch.Tensor.float, torch.Tensor.to, torch.nn.functional.softmax = float_, to, softmax
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to = orig_float, orig_to
        torch.nn.functional.softmax = orig_softmax


def hf_logits(model, tok, stock: bool = False) -> np.ndarray:
    """transformers' logits [B, T, V] as float64 numpy (float64 models under ``keep_float64``
    unless ``stock``)."""
    f64 = next(model.parameters()).dtype == torch.float64
    with torch.no_grad(), (keep_float64() if f64 and not stock else contextlib.nullcontext()):
        out = model(tok).logits
    return out.detach().double().numpy()


def memcore_logits(spec, params, tok, backend: str, form: str) -> np.ndarray:
    """memcore's logits [B, T, V] as float64 numpy: the parallel form on the whole sequence, or
    the streaming form stepped token by token from ``init_state``."""
    model = memcore.realize(spec, backend=backend, params=params)
    B, T = tok.shape
    if backend == "jax":
        import jax.numpy as jnp

        x = jnp.asarray(tok.numpy())
    elif backend == "reference":
        x = tok.numpy()
    else:
        x = tok
    if form == "parallel":
        with torch.no_grad():
            y, _ = model(x)
        return _np(y)
    state = model.init_state(B, max_len=T) if backend == "jax" else model.init_state(B)
    ys = []
    with torch.no_grad():
        for t in range(T):
            y, state = model.step(x[:, t], state)
            ys.append(_np(y))
    return np.stack(ys, axis=1)


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().double().numpy()
    return np.asarray(a, dtype=np.float64)


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())
