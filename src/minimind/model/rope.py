"""Rotary position embeddings (non-interleaved, `rotate_half`, as HF Llama/Qwen3 and MiniMind).

Frequencies are computed once; cos/sin are evaluated for the positions of each forward call, so no
32k-row table lives in memory and left-padded batches get per-row positions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import MiniMindConfig


def minimind_yarn(inv_freq: torch.Tensor, dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """Standard YaRN ramp as MiniMind writes it (2025-12 onwards, minimind-3): f' = f((1-r) + r/s)."""
    orig_max = scaling.get("original_max_position_embeddings", 2048)
    factor = scaling.get("factor", 16)
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)
    attention_factor = scaling.get("attention_factor", 1.0)

    def inv_dim(beta: float) -> float:
        return (dim * math.log(orig_max / (beta * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(inv_dim(beta_fast)), 0)
    high = min(math.ceil(inv_dim(beta_slow)), dim // 2 - 1)
    ramp = torch.clamp((torch.arange(dim // 2).float() - low) / max(high - low, 0.001), 0, 1)
    return inv_freq * (1 - ramp + ramp / factor), float(attention_factor)


def minimind_legacy_yarn(inv_freq: torch.Tensor, dim: int, scaling: dict) -> torch.Tensor:
    """The 2510-era formula (Oct-Nov 2025, factor 4): per-dim beta, lambda = (b*a - b + 1)/(b*a) below the
    first dimension whose wavelength exceeds the original context, 1/a above it; no attention factor."""
    orig_max = scaling.get("original_max_position_embeddings", 2048)
    factor = scaling.get("factor", 4)
    beta_fast, beta_slow = scaling.get("beta_fast", 4.0), scaling.get("beta_slow", 1.0)
    half = dim // 2
    corr_dim = next((i for i in range(half) if 2 * math.pi / inv_freq[i] > orig_max), half)
    power = torch.arange(half).float() / max(half - 1, 1)
    beta = beta_slow + (beta_fast - beta_slow) * power
    scale = torch.where(torch.arange(half) < corr_dim, (beta * factor - beta + 1) / (beta * factor), 1.0 / factor)
    return inv_freq * scale


def _hf_rope(config: MiniMindConfig, scaling: dict) -> tuple[torch.Tensor, float]:
    """Any other HF rope type (llama3, linear, dynamic, longrope): delegate to transformers itself."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = scaling.get("rope_type", scaling.get("type"))
    params = {k: v for k, v in scaling.items() if k != "type"}
    params.update(rope_type=kind, rope_theta=config.rope_theta)
    hf = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                     head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                     rope_parameters=params)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    return inv_freq.float(), float(attention_factor)


def rope_frequencies(config: MiniMindConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention scaling) for the config's RoPE variant."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    # MiniMind applies YaRN only when the table (max_position_embeddings) exceeds the original context.
    applies = config.max_position_embeddings / scaling.get("original_max_position_embeddings", 2048) > 1.0
    if kind == "minimind_legacy_yarn":
        return (minimind_legacy_yarn(inv_freq, dim, scaling) if applies else inv_freq), 1.0
    if kind == "yarn":
        return minimind_yarn(inv_freq, dim, base, scaling) if applies else (inv_freq, 1.0)
    if kind == "hf_yarn":  # an HF config's YaRN outside the range where MiniMind's formula equals HF's
        return _hf_rope(config, {**scaling, "rope_type": "yarn"})
    return _hf_rope(config, scaling)


class RotaryEmbedding(nn.Module):
    """Maps position ids [B, S] to (cos, sin) [B, S, head_dim] in fp32."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        with torch.device("cpu"):  # real numbers even when the model is built on the meta device
            inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.half()/to(bf16) must not degrade the frequencies: keep them fp32 on whatever device.
        inv = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D]; cos/sin fp32, broadcastable to x ([B, 1, S, D] for x [B, H, S, D]). Computed in fp32, returned
    in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
