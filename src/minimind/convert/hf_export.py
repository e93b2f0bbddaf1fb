"""`--to hf`: a folder in the standard architecture each release maps to (the table is in docs/deploy.md), loadable
without remote code; MiniMind2 MoE has none, so it is `model_type: minimind` unless `--arch qwen2_moe` is asked for.
Parameter names are already HF's, so the weights are written as they are (lm_head omitted when tied).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint.int8 import QUANT_METHOD, quantize_state_dict
from ..checkpoint.lora import lora_layers
from ..checkpoint.spec import NO_LORA, ModelSpec
from ..config import MiniMindConfig
from .output import atomic_output, dtype_name, progress, write_metadata
from .source import ConvertError, export_dtype, load_source

log = logging.getLogger("minimind")
_CLASS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
          "qwen2_moe": "Qwen2MoeForCausalLM", "minimind": "MiniMindForCausalLM"}
ARCHS = tuple(_CLASS)


def choose_arch(config: MiniMindConfig) -> str:
    """The standard architecture that computes exactly what our model computes (fp32)."""
    if config.use_moe:
        if config.n_shared_experts or not config.qk_norm:
            return "minimind"  # MiniMind2 MoE: top-2 + ungated shared expert, no q/k norm
        return "qwen3_moe"
    return "qwen3" if config.qk_norm else "llama"


def standard_rope(config: MiniMindConfig) -> dict | None:
    """`rope_scaling` for an HF config: standard YaRN as is; MiniMind's legacy factor-4 formula has no HF
    equivalent, so it is dropped (the weights were trained without it) with a warning."""
    scaling = config.rope_scaling
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "minimind_legacy_yarn":
        log.warning("the checkpoint enables MiniMind's legacy YaRN (factor 4, Oct-Nov 2025 formula), which no "
                    "standard implementation (transformers, vLLM, llama.cpp) has: exporting with plain RoPE, as the "
                    "weights were trained (set rope_scaling yourself for contexts beyond 2048 tokens)")
        return None
    out = {k: v for k, v in scaling.items() if k != "type"}
    out["rope_type"] = kind
    out["type"] = kind  # transformers < 4.45 and vLLM read `type`
    return out


def renormalizes(config: MiniMindConfig) -> bool:
    """Whether the top-k weights are renormalised (MiniMind2 does it only for top_k > 1; see model/layers.py)."""
    return bool(config.norm_topk_prob and (config.num_experts_per_tok > 1 or config.family == "minimind3"))


def hf_config_dict(config: MiniMindConfig, arch: str, dtype: torch.dtype) -> dict:
    import transformers

    if arch == "minimind":
        return {**config.to_dict(), "architectures": ["MiniMindForCausalLM"], "model_type": "minimind",
                "torch_dtype": dtype_name(dtype)}
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta")
    out = {"architectures": [_CLASS[arch]], "model_type": arch, **{k: getattr(config, k) for k in same},
           "rope_scaling": standard_rope(config), "tie_word_embeddings": bool(config.tie_word_embeddings),
           "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
           "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id, "torch_dtype": dtype_name(dtype),
           "transformers_version": transformers.__version__}
    if arch == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    if arch in ("qwen3_moe", "qwen2_moe"):
        out.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                   moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=renormalizes(config),
                   decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                   router_aux_loss_coef=0.001)
    if arch == "qwen2_moe":
        # q/k/v biases are always present in transformers 4.x and vLLM's Qwen2-MoE: zeros are written.
        out.update(qkv_bias=True, shared_expert_intermediate_size=config.intermediate_size * config.n_shared_experts)
    return out


def _check_arch(config: MiniMindConfig, arch: str) -> None:
    if arch not in ARCHS:
        raise ConvertError(f"unknown HF architecture {arch!r}; choose from {', '.join(ARCHS)}")
    as_qwen2_moe = config.use_moe and not config.qk_norm and config.n_shared_experts > 0
    if arch not in ("minimind", choose_arch(config)) and not (arch == "qwen2_moe" and as_qwen2_moe):
        raise ConvertError(f"a {config.era} model ({'MoE' if config.use_moe else 'dense'}, "
                           f"{'with' if config.qk_norm else 'without'} q/k norm) cannot be expressed as {arch}; "
                           f"the matching architecture is {choose_arch(config)}")


def _qwen2_moe_weights(config: MiniMindConfig, sd: dict) -> dict:
    """MiniMind2 MoE as Qwen2-MoE, exactly: Qwen2-MoE scales its shared expert by sigmoid(gate(x)); a zero gate
    gives 0.5, so the shared expert's down_proj is doubled (a power of two: exact). Zero q/k/v biases."""
    out = merge_shared_experts(config, sd)
    kv = config.num_key_value_heads * config.head_dim
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        dtype = sd[p + "self_attn.q_proj.weight"].dtype
        for name, rows in (("q_proj", config.num_attention_heads * config.head_dim), ("k_proj", kv), ("v_proj", kv)):
            out[f"{p}self_attn.{name}.bias"] = torch.zeros(rows, dtype=dtype)
        out[f"{p}mlp.shared_expert.down_proj.weight"] = out[f"{p}mlp.shared_expert.down_proj.weight"] * 2
        out[f"{p}mlp.shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size, dtype=dtype)
    return out


def merge_shared_experts(config: MiniMindConfig, sd: dict) -> dict:
    """`mlp.shared_experts.{j}` as one wider SwiGLU `mlp.shared_expert` (gate/up rows and down columns
    concatenated), which computes their sum."""
    out = {k: v for k, v in sd.items() if ".shared_experts." not in k}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            parts = [sd[f"{p}shared_experts.{j}.{proj}.weight"] for j in range(config.n_shared_experts)]
            out[f"{p}shared_expert.{proj}.weight"] = torch.cat(parts, dim=dim)
    return out


def export_hf(src, out_dir, *, dtype=None, arch: str | None = None, tokenizer=None, lora=None,
              force: bool = False, show_progress: bool = True) -> Path:
    """config.json, generation_config.json, model.safetensors and the tokenizer files; dtype None/"auto" keeps
    the source's storage dtype (float32 when a LoRA is merged), "int8" writes the int8 format."""
    from safetensors.torch import save_file

    source = load_source(src, tokenizer=tokenizer, lora=lora)
    if dtype == "int8":
        return quantize_int8(source, out_dir, force=force, show_progress=show_progress)
    config = source.config
    arch = arch or choose_arch(config)
    _check_arch(config, arch)
    torch_dtype = export_dtype(dtype, torch.float32 if merges_lora(src, lora) else source.dtype)
    config_json = hf_config_dict(config, arch, torch_dtype)
    sd = _qwen2_moe_weights(config, source.state_dict) if arch == "qwen2_moe" else source.state_dict
    if source.tokenizer is None:
        log.warning("no tokenizer given: the HF folder will have weights and config only (pass --tokenizer DIR)")
    with atomic_output(out_dir, force, folder=True) as tmp:
        with progress(f"Converting to {_CLASS[arch]} ({dtype_name(torch_dtype)})", 1, show_progress) as advance:
            # clone: safetensors refuses shared storage (a tied or viewed tensor), and must not alias the source
            tensors = {k: v.to(torch_dtype).contiguous().clone() for k, v in sd.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            advance()
        write_metadata(tmp, config_json, source)
        if arch == "minimind":
            (tmp / "README.md").write_text(_MINIMIND_README.format(era=config.era))
    return Path(out_dir)


def merges_lora(src, lora) -> bool:
    """Whether an export folds a LoRA into the weights (`lora` also names the one a loaded Source has merged).
    W + BA is then written in float32 unless a dtype is asked for: rounded to the base's fp16 it moves the logits
    by about 1e-3 (the adapter's delta is small beside W)."""
    if isinstance(src, ModelSpec):
        lora = src.lora_weight
    return lora not in NO_LORA or (isinstance(src, torch.nn.Module) and bool(lora_layers(src)))


def quantize_int8(src, out_dir, *, tokenizer=None, lora=None, force: bool = False,
                  show_progress: bool = True) -> Path:
    """The int8 weight-only folder (format: checkpoint/int8.py); the tensors kept in float are fp32."""
    from safetensors.torch import save_file

    source = load_source(src, tokenizer=tokenizer, lora=lora)
    quant = {"quant_method": QUANT_METHOD, "bits": 8, "scheme": "symmetric_per_output_channel",
             "scale_dtype": "float32"}
    with atomic_output(out_dir, force, folder=True) as tmp:
        with progress("Quantizing to int8", 2, show_progress) as advance:
            tensors, quantized = quantize_state_dict(source.state_dict, torch.float32)
            advance()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "quant": QUANT_METHOD})
            advance()
        config_json = hf_config_dict(source.config, "minimind", torch.float32)
        write_metadata(tmp, {**config_json, "quantization_config": {**quant, "quantized": quantized}}, source)
    return Path(out_dir)


_MINIMIND_README = """# {era} (model_type: minimind)

This MoE model (top-k routed experts plus an ungated shared expert) has no standard Hugging Face architecture.

- Load it with the `minimind` package: `minimind chat THIS_FOLDER`, `minimind serve THIS_FOLDER`, or
  `minimind.load_model("THIS_FOLDER")`. No remote code is involved.
- vLLM / SGLang / plain transformers: they do not know `model_type: minimind` and will refuse this folder.
  Re-export with `minimind convert SRC DST --to hf --arch qwen2_moe`: an exact re-expression as
  Qwen2MoeForCausalLM (zero shared-expert gate, doubled shared down_proj, zero q/k/v biases) that they serve.
- GGUF / llama.cpp: `minimind convert THIS_FOLDER out.gguf --to gguf` writes llama.cpp's `bailingmoe`
  architecture, whose MoE block is exactly this one.
"""
