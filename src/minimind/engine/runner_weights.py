"""The runner's own weights: per layer a fused q|k|v and gate|up matrix (or MoE experts), in the format the step
computes with (fp32, bf16, int8, GGUF blocks), taken from a MiniMindForCausalLM without changing its math."""
from __future__ import annotations

import copy

import torch

from ..checkpoint.safetensors_file import stacked_view
from .moe import MoEWeights
from .quant import BlockLinear, make_linear


class LayerWeights:
    def __init__(self, layer, quantization: str | None, dtype: torch.dtype, weight_dtype: torch.dtype):
        attn = layer.self_attn
        self.ln1 = cast_module(layer.input_layernorm, dtype)
        self.ln2 = cast_module(layer.post_attention_layernorm, dtype)
        self.q_norm = cast_module(getattr(attn, "q_norm", None), dtype)
        self.k_norm = cast_module(getattr(attn, "k_norm", None), dtype)

        def linear(*projections):  # several: fused into one matrix; one: its own weight, no copy
            kept = blocks(*projections)
            if kept is not None:
                return kept
            weights = [_weight(p) for p in projections]
            w = weights[0] if len(weights) == 1 else stacked_view(weights)
            return make_linear(torch.cat(weights) if w is None else w, quantization, dtype, weight_dtype)

        self.qkv, self.o = linear(attn.q_proj, attn.k_proj, attn.v_proj), linear(attn.o_proj)
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):  # dense SwiGLU
            self.gate_up, self.down = linear(mlp.gate_proj, mlp.up_proj), linear(mlp.down_proj)
            self.act, self.moe = mlp.act_fn, None
        else:  # MoE: the model's routing over the runner's expert linears (engine/moe.py)
            self.gate_up = self.down = None
            self.moe = MoEWeights(mlp, linear)


def cast_module(module, dtype: torch.dtype):
    """The runner's own copy of a small module in the activation dtype (the caller's model is not touched)."""
    if module is None:
        return None
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


def release_matrices(*modules) -> None:
    """Point the 2-D parameters of these projection modules at empty tensors. A copy the runner made (int8, a fused
    q|k|v, a cast) then owns the only storage; where the runner kept the same values it holds a detached view
    (DenseLinear detaches), which keeps that storage alive: nothing the runner uses is freed."""
    for module in modules:
        for p in module.parameters():
            if p.dim() == 2:
                p.data = torch.empty(0, dtype=p.dtype)
        if hasattr(module, "gguf_blocks"):  # the runner holds its own BlockLinear (or a dequantized copy)
            del module.gguf_blocks


def _weight(linear) -> torch.Tensor:
    """A projection's weight as the model's forward applies it: an unmerged LoRALinear counts W + B A; GGUF blocks
    dequantized."""
    if hasattr(linear, "gguf_blocks"):
        ggml_type, raw = linear.gguf_blocks
        return BlockLinear(raw, ggml_type, linear.in_features if hasattr(linear, "in_features")
                           else linear.embedding_dim).dequantize()
    merged = getattr(linear, "merged_weight", None)
    return merged() if merged is not None else linear.weight


def blocks(*modules) -> BlockLinear | None:
    """One BlockLinear over these modules' GGUF blocks (rows stacked: q|k|v, gate|up) when they all have blocks
    of one type (or of Q4_K and Q6_K), else None (the caller dequantizes)."""
    kept = [getattr(m, "gguf_blocks", None) for m in modules]
    if any(k is None for k in kept):
        return None
    m = modules[0]
    return BlockLinear.stack(kept, m.in_features if hasattr(m, "in_features") else m.embedding_dim)
