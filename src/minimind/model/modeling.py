"""MiniMindModel / MiniMindForCausalLM: core.py's decoder as HF PreTrainedModels (generate, save_pretrained, Auto
classes), with MiniMind's parameter names (= HF Llama / Qwen3 names).

Importing this module costs transformers' modeling_utils (~90 MB of RSS) and registers model_type "minimind".
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import MiniMindConfig
from .core import BackboneMixin, CausalLMMixin
from .layers import RMSNorm
from .rope import RotaryEmbedding, rope_frequencies


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):  # non-persistent buffer lost on meta-device init
            inv_freq, module.attention_scaling = rope_frequencies(self.config)
            device = module.inv_freq.device
            module.inv_freq = inv_freq.to("cpu" if device.type == "meta" else device)


class MiniMindModel(BackboneMixin, MiniMindPreTrainedModel):
    """The decoder stack as an HF PreTrainedModel (submodules and forward from core.BackboneMixin)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self._build_backbone(config)
        self.post_init()


class MiniMindForCausalLM(CausalLMMixin, MiniMindPreTrainedModel, GenerationMixin):
    """The HF-compatible causal LM (generate, save_pretrained, Auto classes); same modules and math as
    core.MiniMindLM."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig | None = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self._build_head(config)
        self.post_init()
        self.tie_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                cache=None, **kwargs) -> CausalLMOutputWithPast:
        # transformers >= 5.24 hands the cache to forward as `cache` (generate included); older ones and callers
        # written for them say `past_key_values`. Ignoring either would decode every step without the prompt.
        past_key_values = cache if cache is not None else past_key_values
        if use_cache and past_key_values is None and not self.training:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        logits = self._logits(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                              logits_to_keep)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values})


# the output's cache field: `cache` from transformers 5.24 (the old name still works there, with a warning)
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type 'minimind' without trust_remote_code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
    AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)


register_auto_classes()  # whoever can build the HF class can also load it through AutoModel
