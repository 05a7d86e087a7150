"""The official Memory Mosaics model (facebookresearch/MemoryMosaics) as a memcore model spec
and params."""

from __future__ import annotations

import argparse
import math

import numpy as np

from memcore.spec import Model, Mosaic, Persistent
from memcore.spec.params import check_params

from .arrays import as_dict, shape_error, to_numpy

__all__ = ["from_memory_mosaics"]

# --- Memory Mosaics (facebookresearch/MemoryMosaics, StackAssoMem) --------------------------

# Per block: the parts common to both official versions, then each version's key extractors
# (plain ``memory_mosaics``: a kernel-1 Conv1d then a dense leaky average; ``memory_mosaics_eft``,
# which the official training script trains: ``LeakyAverageCuda``, a Linear then a scan).
_MM_KEYS = {
    "common": ("ln1.weight", "attn.v_featurizer.linear.weight", "attn.v_featurizer.coef",
               "attn.c_proj.weight", "attn.kernel_beta", "attn.value_beta"),
    "common_ffn": ("ln2.weight", "pmem.c_proj.weight", "pmem.kernel_beta", "pmem.value_beta",
                   "pmem.pmem.M_k0", "pmem.pmem.M_v0"),
    "plain": ("k_featurizer.conv.weight", "leaky_key_beta"),
    "eft": ("leaky_average.linear.weight", "leaky_average.leaky_beta_w_under",
            "leaky_average.leaky_beta_u_under"),
}


def _mm_block_keys(i: int, ffn: bool, version: str) -> list[str]:
    b = f"blocks.{i}."
    units = ("attn.", "pmem.") if ffn else ("attn.",)
    keys = [b + k for k in _MM_KEYS["common"] + (_MM_KEYS["common_ffn"] if ffn else ())]
    return keys + [b + u + k for u in units for k in _MM_KEYS[version]]


def _strip_wrapper_prefix(sd: dict) -> dict:
    # torch.compile and DistributedDataParallel save every name under one extra prefix.
    for prefix in ("_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# memcore's parameter name -> the official module's, for the tensors that copy as they are.
_CONTEXTUAL_NAMES = (("v_proj.weight", "v_featurizer.linear.weight"),
                     ("o_proj.weight", "c_proj.weight"), ("k_scale", "kernel_beta"),
                     ("v_scale", "value_beta"), ("v_mix", "v_featurizer.coef"))
_PERSISTENT_NAMES = (("o_proj.weight", "c_proj.weight"), ("k_scale", "kernel_beta"),
                     ("out_scale", "value_beta"))

# StackAssoMem's options that change its function, with the one value memcore can map and
# what another value builds. The shapes say the sizes (n_head, ...); the options say the rest.
_MM_REQUIRED = ("pre_ln", "v_shift")
_MM_OPTIONS = {
    "pre_ln": (True, "post-norm blocks (x = ln(x), then x + unit(x)); memcore's blocks are "
                     "pre-norm residual blocks"),
    "v_shift": (1, "values that look v_shift tokens ahead, read by queries v_shift tokens "
                   "later; memcore's associative readout (DESIGN 2.5) looks exactly one ahead"),
    "bias": (False, "biases in the LayerNorm and Linear layers, which memcore's mosaic layers "
                    "lack"),
    "weight_tying": (True, "an output head of its own; memcore ties the head to the "
                           "embedding"),
    "pmem_count": (1, "an average of several persistent-memory softmax readouts"),
    "v_fe_type": ("lowrlinearconv", "another value featurizer"),
    "v_kernel_size": (2, "another value featurizer width"),
}
# The plain version's key featurizer (the eft version builds none: its LeakyAverageCuda takes
# a Linear whatever these say).
_MM_PLAIN_OPTIONS = {
    "k_fe_type": ("linearconv", "another key featurizer"),
    "k_kernel_size": (1, "a key convolution wider than one token"),
}


def _mm_config(owner: str, config) -> dict:
    if config is None:
        raise ValueError(
            f"{owner}: config= is required: a state dict does not say how the model was built "
            f"(pre_ln and v_shift change the function but no tensor). Pass the StackAssoMem "
            f"options (the training checkpoint's 'model_args', or a dict with at least "
            f"{list(_MM_REQUIRED)}), or the checkpoint itself")
    if isinstance(config, argparse.Namespace):  # the training script's parsed options
        config = vars(config)
    if not hasattr(config, "keys") or not hasattr(config, "__getitem__"):
        raise TypeError(f"{owner}: config must be a mapping (or an argparse.Namespace) of "
                        f"StackAssoMem options, got {type(config).__name__}")
    config = {str(k): config[k] for k in config.keys()}
    missing = [k for k in _MM_REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{owner}: config lacks {missing}: these options change the model's "
                         f"function and no tensor of the state dict records them")
    return config


def _same(value, expected) -> bool:
    if isinstance(expected, bool):
        return isinstance(value, (bool, np.bool_)) and bool(value) == expected
    if isinstance(expected, int):
        return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
                and int(value) == expected)
    return value == expected


def _check_mm_config(owner: str, config: dict, version: str, sizes: dict) -> None:
    """Refuse, by name, an option whose value memcore cannot map or that the shapes contradict."""
    options = dict(_MM_OPTIONS, **(_MM_PLAIN_OPTIONS if version == "plain" else {}))
    for name, (want, builds) in options.items():
        if name in config and not _same(config[name], want):
            raise ValueError(f"{owner}: config[{name!r}]={config[name]!r} is not supported (only "
                             f"{want!r}): it builds {builds}")
    for name, value in sizes.items():
        if name in config and not _same(config[name], value):
            raise ValueError(f"{owner}: config[{name!r}]={config[name]!r} but the state dict's "
                             f"shapes give {value!r}")


def _split_checkpoint(owner: str, source, config):
    """(state dict, config) from a state dict and config=, or from a training checkpoint
    (``{"model": state dict, "model_args": options, ...}``)."""
    sd = as_dict(owner, source)
    if "model" in sd and "model_args" in sd and "emb.weight" not in sd:
        if config is not None:
            raise ValueError(f"{owner}: the checkpoint carries its options ('model_args'); do "
                             f"not give config= as well")
        return as_dict(owner, sd["model"]), sd["model_args"]
    return sd, config


def _leaky(owner: str, p: dict, unit: str, version: str, H: int) -> np.ndarray:
    """memcore's ``leak`` (decay exp(-10 |leak|)) of one unit's key extractor."""
    if version == "plain":
        return p[unit + "leaky_key_beta"]
    w_name = unit + "leaky_average.leaky_beta_w_under"
    u_name = unit + "leaky_average.leaky_beta_u_under"
    w, u = p[w_name], p[u_name]
    if w.shape != (H,):
        raise shape_error(owner, w_name, f"[{H}] (one decay per head, leaky_per_head=True)",
                           w.shape)
    if u.shape != (H,) or not np.array_equal(np.abs(u), np.abs(w)):
        raise ValueError(f"{owner}: state_dict[{u_name!r}] differs from {w_name!r} in magnitude "
                         f"(a LeakyAverageCuda built with sep_w_on_t=True): the current token "
                         f"then weighs differently from the leaky average's, which memcore's "
                         f"leaky_average (DESIGN 2.2) cannot say")
    return w


def from_memory_mosaics(state_dict, n_heads: int | None = None, *,
                        config=None) -> tuple[Model, dict]:
    """The official Memory Mosaics model (``StackAssoMem`` of facebookresearch/MemoryMosaics,
    ``Library/memory_mosaics/models``, either version: ``memory_mosaics`` or
    ``memory_mosaics_eft``, which ``Library/train_memory_mosaics.py`` trains) as a memcore
    model spec and params.

    ``state_dict``: the model's state dict, with ``config`` its constructor options (a mapping
    or an argparse.Namespace; the training script saves them as ``model_args``); or a
    checkpoint of the training script itself (``{"model": ..., "model_args": ...}``), whose
    options are used. A state dict alone does not say how the blocks were built, so the
    options must give ``pre_ln`` and ``v_shift``. Options memcore cannot map are refused by
    name: ``pre_ln=False`` (post-norm blocks), ``v_shift != 1``, ``bias=True``,
    ``weight_tying=False``, ``pmem_count != 1``, another value featurizer (``v_fe_type``,
    ``v_kernel_size``) and, in the plain version, another key featurizer (``k_fe_type``,
    ``k_kernel_size``); ``n_head``, ``n_embd``, ``n_layer``, ``vocab_size``, ``pmem_size`` and
    ``attn_only`` must agree with the shapes. The other options do not change the eval-mode
    function (dropouts; ``block_size``, the official model's longest input, which memcore does
    not limit; ``skip_tokens``, which only trims the training loss) or are training options the
    model never receives (``att_shift``, ``v_leaky``, ...).

    The spec: one ``mosaic`` mixer per block, a ``persistent`` FFN with the model's slot count
    (or no FFN for ``attn_only=True``), ``norm="layer"``, and ``logit_scale = 1 / sqrt(d_model)``,
    the factor that model applies to its logits. n_heads, if given, must agree with the
    per-head parameters.

    Conversions (each exact; the official code is the ground truth):

    - Keys. Plain version: ``k_featurizer.conv.weight`` [D, D, 1] (a kernel-1 Conv1d) is
      ``k_proj.weight`` = ``conv.weight[:, :, 0]`` (both [out, in]), and its leaky average
      multiplies every key by (1 - exp(-10 |p_h|)). Eft version: ``leaky_average.linear.weight``
      is ``k_proj.weight``, and its scan (the WKV recurrence with k = 0, w = -10 |p_h|,
      u = +10 |p_h|) returns the leaky sum divided by the sum of its weights. Both factors are
      one scalar per head and position, which the L2 normalisation that follows removes, so
      memcore's ``leaky_average`` omits them. ``leak`` = ``leaky_key_beta`` or
      ``leaky_beta_w_under`` (p_h: decay exp(-10 |p_h|)); the eft's ``leaky_beta_u_under`` must
      equal it in magnitude (the same parameter, as the model builds it).
    - ``kernel_beta`` = ``k_scale`` (key scale exp(min(10 q, 5)); squared in the persistent
      unit in both), ``value_beta`` = ``v_scale`` (contextual) or ``out_scale`` (persistent)
      (scale exp(10 r)), ``v_featurizer.coef`` = ``v_mix`` (c in (1 - c) x_{t+1} + c x_t).
    - ``pmem.pmem.M_k0`` / ``M_v0`` [1, H, P, E] drop the leading axis: ``mem_k`` / ``mem_v``.
    - ``c_proj.weight`` = ``o_proj.weight``; ``ln1``/``ln2``/``ln_out`` = ``norm1``/``norm2``/
      ``norm_f`` (both LayerNorm without bias, eps 1e-5); ``emb.weight`` = ``embed.weight``.

    Dropout is a training-time operation and has no parameters; the mapped model is the
    official model in eval mode. Names left by torch.compile (``_orig_mod.``) or
    DistributedDataParallel (``module.``) are stripped.
    """
    owner = "from_memory_mosaics"
    sd, config = _split_checkpoint(owner, state_dict, config)
    sd = _strip_wrapper_prefix(sd)
    config = _mm_config(owner, config)
    if "emb.weight" not in sd:
        raise ValueError(f"{owner}: state_dict has no 'emb.weight'; expected the keys of a "
                         f"StackAssoMem model (emb.weight, blocks.<i>..., ln_out.weight)")
    block_ids = set()
    for k in sd:
        parts = k.split(".")
        if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
            block_ids.add(int(parts[1]))
    n_layers = len(block_ids)
    if n_layers == 0 or block_ids != set(range(n_layers)):
        raise ValueError(f"{owner}: expected blocks numbered 0..L-1, got block ids "
                         f"{sorted(block_ids)}")
    ffn = any(k.startswith("blocks.0.pmem.") for k in sd)
    if any(k.startswith("blocks.") and ".pmem.pmem.M_k" in k and not k.endswith("M_k0")
           for k in sd):
        raise ValueError(f"{owner}: the model has more than one persistent memory "
                         f"(pmem_count > 1): an average of several softmax readouts has no "
                         f"memcore equivalent")
    version = "eft" if "blocks.0.attn.leaky_average.linear.weight" in sd else "plain"
    expected = ["emb.weight", "ln_out.weight"]
    for i in range(n_layers):
        expected += _mm_block_keys(i, ffn, version)
    missing = sorted(set(expected) - set(sd))
    unknown = sorted(set(sd) - set(expected) - {"head.weight"})
    if missing or unknown:
        raise ValueError(f"{owner}: state_dict keys do not match a StackAssoMem model "
                         f"({version} version) with {n_layers} blocks"
                         f"{'' if ffn else ' (attn_only)'}: missing {missing}, unknown {unknown} "
                         f"(biases, other featurizers and other versions are not supported)")
    p = {k: to_numpy(k, v) for k, v in sd.items()}

    emb = p["emb.weight"]
    if emb.ndim != 2:
        raise shape_error(owner, "emb.weight", "[vocab_size, d_model]", emb.shape)
    V, D = emb.shape
    if "head.weight" in p and not np.array_equal(p["head.weight"], emb):
        raise ValueError(f"{owner}: head.weight differs from emb.weight (a model built with "
                         f"weight_tying=False); memcore's models tie the output head")
    beta = p["blocks.0.attn.kernel_beta"]
    if beta.ndim != 1:
        raise shape_error(owner, "blocks.0.attn.kernel_beta", "[n_heads]", beta.shape)
    H = beta.shape[0]
    if n_heads is not None and n_heads != H:
        raise ValueError(f"{owner}: n_heads={n_heads} was given but blocks.0.attn.kernel_beta "
                         f"has {H} entries (one per head)")
    if D % H:
        raise ValueError(f"{owner}: d_model={D} is not divisible by n_heads={H}")
    for k in p:
        if k.endswith("conv.weight") and (p[k].ndim != 3 or p[k].shape[2] != 1):
            raise shape_error(owner, k, f"[{D}, {D}, 1] (a kernel-1 linearconv)", p[k].shape)
    ffn_spec, sizes = None, {"n_head": H, "n_embd": D, "n_layer": n_layers, "vocab_size": V,
                             "attn_only": not ffn}
    if ffn:
        mk = p["blocks.0.pmem.pmem.M_k0"]
        if mk.ndim != 4 or mk.shape[0] != 1:
            raise shape_error(owner, "blocks.0.pmem.pmem.M_k0", f"[1, {H}, slots, {D // H}]",
                               mk.shape)
        ffn_spec = Persistent(D, H, mk.shape[2])
        sizes["pmem_size"] = mk.shape[2]
    _check_mm_config(owner, config, version, sizes)
    spec = Model(tuple(Mosaic(D, H) for _ in range(n_layers)), V, ffn_spec, norm="layer",
                 logit_scale=1.0 / math.sqrt(D))

    def key_proj(unit: str) -> np.ndarray:
        if version == "plain":  # a width-1 convolution: its one tap is the projection
            return p[unit + "k_featurizer.conv.weight"][:, :, 0].copy()
        return p[unit + "leaky_average.linear.weight"]

    out = {"embed.weight": emb, "norm_f.weight": p["ln_out.weight"]}
    for i in range(n_layers):
        b, m, f = f"blocks.{i}.", f"layers.{i}.mixer.", f"layers.{i}.ffn."
        out[f"layers.{i}.norm1.weight"] = p[b + "ln1.weight"]
        out[m + "k_proj.weight"] = key_proj(b + "attn.")
        out[m + "leak"] = _leaky(owner, p, b + "attn.", version, H)
        out.update({m + dst: p[b + "attn." + src] for dst, src in _CONTEXTUAL_NAMES})
        if ffn:
            out[f"layers.{i}.norm2.weight"] = p[b + "ln2.weight"]
            out[f + "k_proj.weight"] = key_proj(b + "pmem.")
            out[f + "leak"] = _leaky(owner, p, b + "pmem.", version, H)
            out.update({f + dst: p[b + "pmem." + src] for dst, src in _PERSISTENT_NAMES})
            for src, dst in (("M_k0", "mem_k"), ("M_v0", "mem_v")):
                t = p[b + "pmem.pmem." + src]
                if t.ndim != 4 or t.shape[0] != 1:
                    raise shape_error(owner, b + "pmem.pmem." + src,
                                       f"[1, {H}, slots, {D // H}]", t.shape)
                out[f + dst] = t[0].copy()
    try:
        check_params(spec, out)
    except ValueError as err:
        raise ValueError(f"{owner}: shapes do not fit a Memory Mosaics model with d_model={D}, "
                         f"n_heads={H}: {err}") from None
    return spec, out
