"""MiniMindModel / MiniMindForCausalLM with the original parameter names (= HF Llama / Qwen3 names)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import MiniMindConfig
from .attention import Attention
from .layers import MLP, MoE, RMSNorm
from .rope import RotaryEmbedding, rope_frequencies


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        eps, fp32w = config.rms_norm_eps, config.rms_norm_fp32_weight
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, fp32w)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, fp32w)
        self.mlp = MoE(config) if config.use_moe else MLP(config)

    def forward(self, h, rope, mask, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True
    _supports_static_cache = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):  # non-persistent buffer lost on meta-device init
            inv_freq, module.attention_scaling = rope_frequencies(self.config)
            device = module.inv_freq.device
            module.inv_freq = inv_freq.to("cpu" if device.type == "meta" else device)


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.rms_norm_fp32_weight)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, **kwargs) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, H]
        b, s = h.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, b, s, past, h.device)
        rope = self.rotary_emb(position_ids)
        mask = build_mask(attention_mask, b, s, past, h.device)
        for layer in self.layers:
            h = layer(h, rope, mask, past_key_values)
        return self.norm(h)


def positions_from_mask(attention_mask, b: int, s: int, past: int, device) -> torch.Tensor:
    """Position of each new token. With left padding the first real token gets position 0 (HF convention);
    the original code used the raw offset, which shifts padded rows."""
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(past, past + s, device=device).expand(b, s)
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -s:]


def build_mask(attention_mask, b: int, s: int, past: int, device) -> torch.Tensor | None:
    """Additive mask [B, 1, S, past+S] (0 / -inf-ish), or None when a plain causal mask suffices."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or s == 1):
        return None
    total = past + s
    q_pos = torch.arange(past, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= q_pos  # [S, total]
    allowed = allowed[None, None].expand(b, 1, s, total)
    if padded:
        allowed = allowed & attention_mask[:, None, None, -total:].bool()
    # finfo.min instead of -inf: fully padded query rows stay finite (their output is ignored).
    mask = torch.zeros(b, 1, s, total, device=device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig | None = None):
        config = config or MiniMindConfig()
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        if use_cache and past_key_values is None and not self.training:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        h = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float()
            loss = nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts the original checkpoints as-is: strips DDP/compile prefixes, fills a missing tied lm_head,
        and explains a config/checkpoint mismatch instead of listing 100 keys."""
        from ..checkpoint.native import explain_mismatch, normalize_state_dict

        state_dict = normalize_state_dict(state_dict, self.config)
        if strict:
            problem = explain_mismatch(state_dict, self)
            if problem:
                raise RuntimeError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type 'minimind' without trust_remote_code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("minimind", MiniMindConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
    except ValueError:
        pass
