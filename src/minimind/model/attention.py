"""Grouped-query self-attention with optional per-head q/k RMSNorm (minimind-3, Qwen3).

The KV cache is any object with `update(k, v, layer_idx) -> (k_all, v_all)` over [B, H_kv, S, D]
tensors: HF's `DynamicCache`/`StaticCache`, or the engine's preallocated cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MiniMindConfig
from .layers import RMSNorm
from .rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.use_sdpa = config.flash_attn
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, config.rms_norm_fp32_weight)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, config.rms_norm_fp32_weight)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache=None) -> torch.Tensor:
        """x [B, S, H]; mask: additive [B, 1, S, S_total] or None (pure causal, no cache); -> [B, S, H]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # per-head norm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]
        cos, sin = rope[0][:, None], rope[1][:, None]  # [B, 1, S, D]: one table for every head
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H_kv, S_total, D]
        out = self.attend(q, k, v, mask)  # [B, heads, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def attend(self, q, k, v, mask):
        if q.shape[2] > 1 and self.use_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                                  is_causal=mask is None, scale=self.scaling,
                                                  enable_gqa=self.num_heads > self.num_kv_heads)
        # One new token (~5x faster than SDPA's CPU kernel here) or flash_attn=False: explicit math, fp32 softmax.
        return self.attend_grouped(q, k, v, mask)

    def attend_grouped(self, q, k, v, mask):
        """q [B, H, S, D] against k/v [B, H_kv, T, D] without repeating k/v: q viewed as [B, H_kv, n_rep * S, D]."""
        b, h, s, d = q.shape
        kv, n_rep = self.num_kv_heads, h // self.num_kv_heads
        scores = (q.reshape(b, kv, n_rep * s, d) @ k.transpose(-2, -1)) * self.scaling  # [B, H_kv, n_rep * S, T]
        scores = scores.view(b, kv, n_rep, s, -1)
        if mask is None and s > 1:
            mask = torch.full((s, s), float("-inf"), device=q.device).triu(1)  # causal, no cache
        if mask is not None:
            scores = scores + mask.unsqueeze(-3).to(scores.dtype)  # [B, 1, S, T] -> [B, 1, 1, S, T]
        probs = F.softmax(scores.float(), dim=-1).type_as(q).view(b, kv, n_rep * s, -1)
        return (probs @ v).view(b, h, s, d)
