"""The decoder in plain torch, and `MiniMindLM`: the causal LM the engine loads.

`MiniMindLM` has the submodules and state_dict keys of `MiniMindForCausalLM` (model.embed_tokens, model.layers.N...,
model.norm, lm_head) but is a bare `nn.Module`: loading it never imports transformers' modeling_utils (~90 MB of
RSS). Both classes are built from the mixins below, so they run one forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MiniMindConfig
from .attention import Attention
from .keys import explain_mismatch, normalize_state_dict
from .layers import MLP, MoE, RMSNorm
from .rope import RotaryEmbedding


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


def positions_from_mask(attention_mask, b: int, s: int, past: int, device) -> torch.Tensor:
    """Position ids [B, S] of the new tokens; with left padding the first real token gets position 0 (as HF)."""
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
    allowed = torch.ones(s, total, dtype=torch.bool, device=device).tril(past)  # [S, total]: key <= query position
    if padded:
        allowed = allowed & attention_mask[:, None, None, -total:].bool()  # [B, 1, S, total]
    # finfo.min instead of -inf: fully padded query rows stay finite (their output is ignored).
    return torch.zeros(b, 1, s, total, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)


class BackboneMixin:
    """The decoder stack (embed_tokens, layers, norm, rotary_emb), mixed into the plain `MiniMindBackbone` and the
    HF `MiniMindModel`, which keep their own __init__."""

    def _build_backbone(self, config: MiniMindConfig) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.rms_norm_fp32_weight)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, cache=None, **kwargs) -> torch.Tensor:
        """-> final hidden states [B, S, H]. past_key_values (transformers >= 5.24: `cache`): any cache with
        `update` and `get_seq_length`."""
        past_key_values = cache if cache is not None else past_key_values
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


class CausalLMMixin:
    """lm_head on top of a backbone in `self.model`, and the forgiving load_state_dict; shared by both LM classes."""

    def _build_head(self, config: MiniMindConfig) -> None:
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def tie_embeddings(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _logits(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        h = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.lm_head(h[:, keep, :])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts MiniMind's checkpoints as saved: strips DDP/compile prefixes, fills a missing tied lm_head, and
        explains a config/checkpoint mismatch instead of listing 100 keys."""
        state_dict = normalize_state_dict(state_dict, self.config)
        if strict:
            problem = explain_mismatch(state_dict, self)
            if problem:
                raise RuntimeError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class MiniMindBackbone(BackboneMixin, nn.Module):
    def __init__(self, config: MiniMindConfig):
        nn.Module.__init__(self)
        self.config = config
        self._build_backbone(config)


@dataclass
class LMOutput:
    """What `model(ids)` returns, with the attribute names of HF's CausalLMOutputWithPast."""

    logits: torch.Tensor
    past_key_values: object = None


class MiniMindLM(CausalLMMixin, nn.Module):
    """The causal LM as a plain torch module: MiniMindForCausalLM's weights, keys and logits, without HF
    generate, save_pretrained or a training loss."""

    def __init__(self, config: MiniMindConfig | None = None):
        nn.Module.__init__(self)
        self.config = config or MiniMindConfig()
        self.name_or_path = ""
        self.model = MiniMindBackbone(self.config)
        self._build_head(self.config)
        self.tie_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, logits_to_keep: int | torch.Tensor = 0, cache=None, **kwargs) -> LMOutput:
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.24's name
        logits = self._logits(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                              logits_to_keep)
        return LMOutput(logits=logits, past_key_values=past_key_values)


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
          "trunc_normal_")


def build_on_meta(model_class, config: MiniMindConfig):
    """An instance of model_class(config) without storage or init, ready for load_state_dict(assign=True).
    Non-persistent buffers (RoPE frequencies) are real: RotaryEmbedding computes them on the CPU."""
    # nn.init is skipped: on the meta device torch runs `normal_`/`uniform_` through torch._refs, which imports
    # torch._dynamo (~70 MB of RSS) for values that loading replaces; transformers' no_init_weights does the same.
    saved = {name: getattr(nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return model_class(config)
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
