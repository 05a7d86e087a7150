"""``MemcoreForCausalLM``: a memcore model as a transformers ``PreTrainedModel``.

The model is the torch backend's ``TorchModel`` (``memcore.realize(spec, backend="torch")``),
held as ``self.model``: parameter names are memcore's, prefixed with ``model.``. Its streaming
state is the cache (``MemcoreCache``): ``generate`` runs the prompt in the parallel form and every
new token through ``step``, in place.

``attention_mask``: a masked token never enters a state. Rows with masked tokens run one by one,
each on its unmasked tokens, so every row gets exactly what it would get alone (see
``MemcoreCache``); logits at masked positions are 0. A batch that masks nothing runs batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import CausalLMOutputWithPast

import memcore
from memcore.backends.torch.modules import private_state
from memcore.backends.torch.numerics import acc_dtype
from memcore.spec.model import has_aux
from memcore.spec.params import init, param_shapes

from .cache import MemcoreCache
from .configuration import MemcoreConfig

# Keyword arguments of transformers' causal-LM loss that a trainer may pass to forward.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


@dataclass
class MemcoreCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``aux_loss``: the layers' aux loss (B'MOJO's innovation
    loss, averaged over the unmasked tokens), None for a model without one."""

    aux_loss: torch.Tensor | None = None


def causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None):
    """Next-token cross-entropy: the logits at t score ``labels[:, t + 1]`` (or
    ``shift_labels[:, t]``); ``ignore_index`` labels count for nothing. The mean over the
    scored tokens, or their sum over ``num_items_in_batch`` (a trainer's count across
    gradient-accumulation steps). Computed in the logits' dtype (the accumulation dtype)."""
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [batch, T] = {tuple(logits.shape[:2])} tensor of "
                         f"token ids, got {got}")
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    target = shift_labels.reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, target, ignore_index=ignore_index)
    total = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _check_mask(attention_mask, B: int, T: int, seen: int):
    """A boolean [B, seen + T] mask (True: a token to use), or None for no mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor of 0s and 1s, got "
                        f"{type(attention_mask).__name__}")
    want = (B, seen + T)
    if tuple(attention_mask.shape) != want:
        raise ValueError(f"attention_mask must have shape [batch, past + new tokens] = {want} "
                         f"(the cache has seen {seen} columns), got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (masked) and 1 (a token to use)")
        attention_mask = attention_mask != 0
    return attention_mask


def _check_keep(logits_to_keep) -> int:
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or \
            logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got "
                         f"{logits_to_keep!r}")
    return logits_to_keep


class MemcoreForCausalLM(PreTrainedModel, GenerationMixin):
    """A memcore model spec (``config.spec``) as a causal language model.

    ``from_config`` (and ``MemcoreForCausalLM(config)``) starts from ``memcore.init(spec,
    seed=config.init_seed)``; ``from_pretrained`` loads the saved parameters (safetensors).
    """

    config_class = MemcoreConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # The cache is a recurrent state: it cannot be cropped back, so assisted generation
    # (which drafts tokens and then drops the rejected ones) is refused by transformers.
    _is_stateful = True
    supports_gradient_checkpointing = False

    def __init__(self, config: MemcoreConfig):
        if not isinstance(config, MemcoreConfig):
            raise TypeError(f"config must be a MemcoreConfig, got {type(config).__name__}")
        super().__init__(config)
        spec = config.model_spec
        dtype = torch.get_default_dtype()  # transformers sets it for from_config(dtype=...)
        if torch.empty(0).device.type == "meta":
            # from_pretrained builds the model on the meta device and then loads every
            # parameter: memcore.init's values would be thrown away.
            params = {n: torch.empty(s, dtype=dtype, device="meta")
                      for n, s in param_shapes(spec).items()}
        else:
            params = init(spec, seed=config.init_seed, dtype=NUMPY_DTYPES.get(dtype, np.float32))
            self._init_values = params
        self.model = memcore.realize(spec, backend="torch", params=params)
        if self.model.embed.weight.dtype != dtype:  # bfloat16: numpy has none
            self.model.to(dtype)
        self.post_init()
        self.__dict__.pop("_init_values", None)

    # -- initial weights ----------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, module):
        """memcore.init's values for ``module``'s own parameters.

        transformers calls this for every module after construction and, after loading, for
        the modules whose parameters a checkpoint lacked; its generic rules (a normal draw for
        Linear and Embedding, ones for norms) are not memcore's parameterisation. Loaded
        parameters are flagged by transformers, and ``initialization.copy_`` leaves them."""
        prefixes = self.__dict__.get("_module_prefixes")
        if prefixes is None:
            prefixes = {id(m): p for p, m in self.model.named_modules()}
            self.__dict__["_module_prefixes"] = prefixes
        prefix = prefixes.get(id(module))
        if prefix is None or not module._parameters:
            return
        values = self.__dict__.get("_init_values")
        if values is None:  # float64 draws, cast below: what memcore.init gives in each dtype
            values = init(self.model.spec, seed=self.config.init_seed, dtype=np.float64)
            self.__dict__["_init_values"] = values
        for leaf, p in module._parameters.items():
            if p is not None and p.device.type != "meta":
                name = f"{prefix}.{leaf}" if prefix else leaf
                hf_init.copy_(p, torch.from_numpy(values[name]).to(p.dtype))

    def initialize_weights(self):
        try:
            super().initialize_weights()
        finally:  # the values are only needed while initialising
            self.__dict__.pop("_init_values", None)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: forward makes a MemcoreCache

    # -- forward --------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, cache=None, labels=None,
                use_cache=None, logits_to_keep=0, return_dict=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, **kwargs):
        """input_ids [B, T] -> logits [B, T, V] (the last ``logits_to_keep`` positions if > 0).

        cache: a ``MemcoreCache`` to continue from, always updated in place; without one, a
            new one is made when ``use_cache`` (default: ``config.use_cache`` outside
            training) and returned as ``out.cache``.
        attention_mask: [B, past + T] of 0/1; masked tokens never enter the state.
        labels: [B, T]; the loss is the shifted next-token cross-entropy, -100 ignored, plus
            ``config.aux_loss_weight`` times the aux loss.
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: a memcore model reads token ids; pass input_ids")
        if output_attentions:
            raise ValueError("output_attentions: memcore layers do not expose attention weights")
        if output_hidden_states:
            raise ValueError("output_hidden_states: memcore models do not return hidden states")
        loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
        if "past_key_values" in kwargs:  # transformers' earlier name of ``cache``
            if cache is not None:
                raise ValueError("pass the cache as cache= or as past_key_values=, not both")
            cache = kwargs.pop("past_key_values")
        if "position_ids" in kwargs:
            raise ValueError("position_ids: a memcore state counts positions itself (masked "
                             "tokens are not counted); pass attention_mask instead")
        if kwargs:
            raise TypeError(f"MemcoreForCausalLM.forward got unexpected arguments "
                            f"{sorted(kwargs)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else \
                type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, T] tensor of token ids, got {got}")
        if cache is not None and not isinstance(cache, MemcoreCache):
            raise TypeError(f"cache must be a MemcoreCache (or None), got "
                            f"{type(cache).__name__}")
        keep = _check_keep(logits_to_keep)
        if labels is not None and keep:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            cache = MemcoreCache()
        B, T = input_ids.shape
        seen = 0 if cache is None else cache.seen
        mask = _check_mask(attention_mask, B, T, seen)
        logits, aux = self._run(input_ids, mask, cache, keep)
        if cache is not None:
            cache.seen += T

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, **loss_kwargs)
            if aux is not None and self.config.aux_loss_weight:
                loss = loss + self.config.aux_loss_weight * aux
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = MemcoreCausalLMOutput(loss=loss, logits=logits, cache=cache, aux_loss=aux)
        return out if return_dict else out.to_tuple()

    def _run(self, ids, mask, cache, keep: int):
        """(logits, aux) for ``ids`` after what ``cache`` holds; ``cache`` is updated."""
        B, T = ids.shape
        seen = 0 if cache is None else cache.seen
        if cache is not None and cache.batch_size not in (-1, B):
            raise ValueError(f"cache holds the state of a batch of {cache.batch_size}, but "
                             f"input_ids has batch {B}")
        new = None if mask is None else mask[:, seen:]
        if mask is not None and cache is not None and seen:
            counts = mask[:, :seen].sum(1).tolist()
            if counts != cache.real_counts():
                raise ValueError(f"attention_mask: its first {seen} columns unmask "
                                 f"{counts} tokens per row, but the cache has seen "
                                 f"{cache.real_counts()}")
        all_on = new is None or bool(new.all())
        if all_on and (cache is None or cache.rows is None):
            state = None if cache is None else cache.state
            logits, state, aux = self._batched(ids, state, keep, cache is not None)
            if cache is not None:
                cache.state = state
            return logits, aux
        if cache is None and not has_aux(self.model.spec) and \
                bool((new[:, 1:] <= new[:, :-1]).all()):
            # Right padding with nothing to keep: a token sees only earlier ones, so the
            # masked tail changes no unmasked position.
            logits, _, aux = self._batched(ids, None, keep, False)
            kept = new[:, -logits.shape[1]:, None]
            return torch.where(kept, logits, logits.new_zeros(())), aux
        if cache is not None:
            cache.to_rows()
            if cache.rows is None:
                cache.rows = [None] * B
            rows = cache.rows
        else:
            rows = [None] * B
        return self._by_row(ids, new, rows, keep)

    def _batched(self, ids, state, keep: int, keep_state: bool):
        """The whole batch on one state: a step for one token after a state, else the
        parallel form."""
        if ids.shape[1] == 1 and state is not None:
            # In place when nothing needs the old state for a backward.
            logits, state, aux = self.model.step_aux(ids[:, 0], state,
                                                     inplace=not torch.is_grad_enabled())
            return logits[:, None], state, aux
        logits, state, aux = self.model.forward_aux(ids, state, logits_to_keep=keep)
        if keep_state and not torch.is_grad_enabled():
            # Later steps write the state in place; the parallel form may return arrays it
            # shares with its input state or views of one buffer.
            state = private_state(state)
        return logits, state, aux

    def _by_row(self, ids, new, rows: list, keep: int):
        """Each row alone on its unmasked tokens; ``rows`` (one state per row) is updated."""
        B, T = ids.shape
        if new is None:  # no mask for these tokens: every one is used
            new = torch.ones((B, T), dtype=torch.bool, device=ids.device)
        K = T if keep == 0 else min(keep, T)
        w = self.model.embed.weight
        out = torch.zeros((B, K, self.config.vocab_size), dtype=acc_dtype(w.dtype),
                          device=ids.device)
        aux_sum, n_sum = None, 0
        for b in range(B):
            cols = torch.nonzero(new[b])[:, 0]
            n = int(cols.numel())
            if n == 0:
                continue
            kept = cols[cols >= T - K]
            r = int(kept.numel())
            logits, rows[b], aux = self._batched(ids[b, cols][None], rows[b], max(r, 1), True)
            if r:
                out[b, kept - (T - K)] = logits[0, -r:]
            if aux is not None:
                aux_sum = aux * n if aux_sum is None else aux_sum + aux * n
                n_sum += n
        if aux_sum is not None:
            aux = aux_sum / n_sum
        else:
            aux = out.new_zeros(()) if has_aux(self.model.spec) else None
        return out, aux
