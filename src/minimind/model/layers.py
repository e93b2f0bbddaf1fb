"""Building blocks: RMSNorm (both cast orders), SwiGLU MLP, and the two MiniMind MoE flavours."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MiniMindConfig

# The activations MiniMindConfig accepts, as plain torch modules: transformers' ACT2FN gives the same functions
# but importing `transformers.activations` pulls in its generation stack (~80 MB of RSS for the engine).
_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU,
                "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh")}


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32.

    fp32_weight=False: weight * norm(x).to(dtype)   (HF Llama/Qwen3, MiniMind2/2510)
    fp32_weight=True:  (weight * norm(x)).to(dtype) (minimind-3)
    """

    def __init__(self, dim: int, eps: float, fp32_weight: bool = False):
        super().__init__()
        self.eps = eps
        self.fp32_weight = fp32_weight
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # aten's fused kernel does it all
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.fp32_weight:
            return (self.weight.float() * normed).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = _ACTIVATIONS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax router -> top-k experts (+ ungated shared experts). Tokens, not sequences, are routed, so a
    batch of many requests runs each expert once on all the tokens that chose it."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        # MiniMind2 renormalises only when top_k > 1; minimind-3 / Qwen3-MoE always (top-1 weight becomes 1.0).
        self.renormalize = config.norm_topk_prob and (self.top_k > 1 or config.family == "minimind3")
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # router: logits = x @ W^T
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size) for _ in range(config.num_experts))
        if config.n_shared_experts > 0:
            self.shared_experts = nn.ModuleList(MLP(config) for _ in range(config.n_shared_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        shared = getattr(self, "shared_experts", ())
        out = route_experts(flat, self.gate(flat), list(self.experts), list(shared), self.top_k, self.renormalize)
        return out.view(shape)


def route_experts(flat: torch.Tensor, logits: torch.Tensor, experts: list, shared: list, top_k: int,
                  renormalize: bool) -> torch.Tensor:
    """MiniMind's MoE routing, for the model and the engine's runner alike. flat [T, H], router logits [T, E] ->
    [T, H]: softmax, the top-k experts (weights divided by their sum + 1e-20 when renormalising), each expert run
    once on the rows that chose it (one host sync for the routing table), plus the ungated shared experts."""
    weight, index = torch.topk(logits.softmax(dim=-1), k=top_k, dim=-1, sorted=False)  # [T, k]
    if renormalize:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    out = torch.zeros_like(flat)
    counts = torch.bincount(index.flatten(), minlength=len(experts)).tolist()
    order = index.flatten().argsort()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        rows = pairs // top_k
        y = experts[e](flat[rows]) * weight.flatten()[pairs, None]  # an fp32 router's weights keep y in fp32
        out.index_add_(0, rows, y.to(out.dtype))
    for expert in shared:
        out = out + expert(flat)
    return out
