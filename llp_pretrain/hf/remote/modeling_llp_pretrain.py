# Part of llp-pretrain's Hugging Face export (llp_pretrain/hf/remote/); copied verbatim by
# `llp-pretrain export --format hf`. Do not edit an exported copy: re-export instead.
"""``transformers`` causal-LM wrapper around the project's ``LMModel`` (variants ``llp``, ``gpt``).

The network is ``llp_models_model.LMModel``, generated from ``llp_pretrain/models``; this file
only adapts it to the ``transformers`` API:

- ``forward(input_ids (B, T))`` returns logits ``(B, T, V)`` for every position, exactly
  ``LMModel(input_ids)``; ``labels`` give the usual shifted mean cross-entropy.
- Generation keeps the model's own decode state in ``LLPPretrainCache`` (a ``transformers``
  ``Cache``): for ``llp`` the previous and current segment of keys/values per layer (flat memory
  and time per token however long the text); for ``gpt`` a key/value cache up to ``seq_len``
  tokens, then a recompute over the last ``seq_len`` tokens per step (as ``LMModel.generate``).
- Padding: right padding (attention mask ``1...10...0``) is exact for scoring because the model
  is causal; left padding is refused (positions would shift).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llp_pretrain import LLPPretrainConfig
from .llp_models_generation import DecodeState, decode_step, new_cache, window_logits
from .llp_models_layers import AttentionBase, rope_inv_freq
from .llp_models_model import LMModel


class _StateLayer(CacheLayerMixin):
    """Per-layer view of an ``LLPPretrainCache``: the storage lives in the model's own cache."""

    def __init__(self, owner: "LLPPretrainCache"):
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("LLPPretrainCache is filled by the model's own decode path")

    def get_mask_sizes(self, query_length: int):
        return self._owner.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx) -> None:
        return None  # the owner reorders its tensors once


class LLPPretrainCache(Cache):
    """Decode state of one generation: ``state`` (the model's ``DecodeState``: ``LLPCache`` or
    ``GPTCache`` plus tokens seen) or None once a ``gpt`` text outgrew ``seq_len``, ``window``
    (the last ``seq_len`` token ids ``(B, <=seq_len)``, kept for ``gpt`` only) and ``seen``."""

    def __init__(self, n_layers: int, state: Optional[DecodeState], window: Optional[torch.Tensor],
                 seen: int):
        super().__init__(layers=[_StateLayer(self) for _ in range(n_layers)])
        self.state, self.window, self.seen = state, window, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows ``beam_idx`` of every cached tensor (beam search)."""
        if self.window is not None:
            self.window = self.window.index_select(0, beam_idx.to(self.window.device))
        if self.state is not None:
            c = self.state.cache
            c.k = [t.index_select(0, beam_idx.to(t.device)) for t in c.k]
            c.v = [t.index_select(0, beam_idx.to(t.device)) for t in c.v]


class LLPPretrainForCausalLM(PreTrainedModel, GenerationMixin):
    """An llp-pretrain language model (``self.lm``: ``LMModel``) behind the causal-LM API."""

    config_class = LLPPretrainConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: LLPPretrainConfig):
        super().__init__(config)
        self.lm = LMModel(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        # RoPE inverse frequencies are a non-persistent buffer (not in the weights file)
        if isinstance(module, AttentionBase):
            with torch.no_grad():
                module.inv_freq.copy_(rope_inv_freq(module.head_dim, module.cfg.rope_theta))
        else:
            super()._init_weights(module)

    def get_input_embeddings(self):
        return self.lm.tok_emb

    def set_input_embeddings(self, value):
        self.lm.tok_emb = value

    def get_output_embeddings(self):
        return self.lm.lm_head

    def _llp_check_mask(self, attention_mask, decoding: bool) -> None:
        if attention_mask is None or bool(attention_mask.all()):
            return
        m = attention_mask.long()
        if decoding or bool((m[:, 1:] > m[:, :-1]).any()):
            raise ValueError("llp-pretrain models take no padding inside or before the text (left padding, or any "
                             "padding while generating); use batch size 1 or right padding for scoring")

    def _llp_prefill(self, ids: torch.Tensor):
        """Logits ``(B, T, V)`` of a prompt and the cache continuing it."""
        cfg = self.lm.cfg
        B, T = ids.shape
        window = ids[:, -cfg.seq_len:] if cfg.variant == "gpt" else None
        if cfg.variant == "gpt" and T > cfg.seq_len:
            # like LMModel.generate: beyond seq_len a gpt recomputes the last seq_len tokens
            logits = self.lm(window)
            return logits, LLPPretrainCache(cfg.n_layers, None, window, T)
        state = DecodeState(new_cache(self.lm, B), 0)
        logits = self.lm(ids, _cache=state.cache)
        state.n = T
        return logits, LLPPretrainCache(cfg.n_layers, state, window, T)

    def _llp_decode(self, ids: torch.Tensor, cache: LLPPretrainCache) -> torch.Tensor:
        """Logits ``(B, k, V)`` of ``k`` new tokens appended to ``cache`` (updated in place)."""
        cfg = self.lm.cfg
        out = []
        for j in range(ids.shape[1]):
            tok = ids[:, j]
            if cache.window is not None:
                cache.window = torch.cat([cache.window, tok[:, None]], dim=1)[:, -cfg.seq_len:]
            if cache.state is not None and (cfg.variant == "llp" or cache.state.n < cfg.seq_len):
                out.append(decode_step(self.lm, tok, cache.state))
            else:
                cache.state = None
                out.append(window_logits(self.lm, cache.window))
            cache.seen += 1
        return torch.stack(out, dim=1)

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, inputs_embeds=None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits ``(B, T, V)`` of ``input_ids`` ``(B, T)``; with ``labels`` ``(B, T)`` also the mean
        next-token cross-entropy over labels != -100. Raises ``ValueError`` for ``inputs_embeds``,
        left padding, or a cache that is not an ``LLPPretrainCache``."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("llp-pretrain models take input_ids, not inputs_embeds")
        own = isinstance(cache, LLPPretrainCache) and cache.seen > 0
        if cache is not None and not own and cache.get_seq_length() > 0:
            raise ValueError(f"llp-pretrain models keep their own cache; got a filled {type(cache).__name__}")
        self._llp_check_mask(attention_mask, decoding=own)
        if own:
            logits, new = self._llp_decode(input_ids, cache), cache
        elif use_cache:
            logits, new = self._llp_prefill(input_ids)
        else:
            logits, new = self.lm(input_ids), None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=new if use_cache else None)
