"""`--to native`: the original project's `.pth` (a plain fp16 state_dict, original key names, no config).

The original ties lm_head to the embedding and saves both keys; both are written too (one shared storage), so the
code of every era loads it with `load_state_dict`, and `torch.load(path, weights_only=True)` reads it. Having no
config, it is rebuilt from the shapes: models whose shapes cannot say everything (e.g. SmolLM2: 9 heads, theta 1e5)
are refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model.keys import infer_config
from .output import atomic_output
from .source import ConvertError, Source, export_dtype, load_source

_CHECKED = ("family", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "use_moe", "num_experts",
            "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "tie_word_embeddings", "qk_norm",
            "hidden_act")  # not rms_norm_fp32_weight: HF Qwen3 vs minimind-3 cast order differs only in fp16/bf16


def check_representable(source: Source, sd: dict[str, torch.Tensor]) -> None:
    """Refuse when re-reading the .pth would infer a different architecture than the source has."""
    found = infer_config(sd, "export")
    diff = [(k, getattr(source.config, k), getattr(found, k)) for k in _CHECKED
            if getattr(source.config, k) != getattr(found, k)]
    scaling = source.config.rope_scaling or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("yarn", "minimind_legacy_yarn"):
        diff.append(("rope_scaling", scaling, None))  # YaRN is an inference flag in the original, not stored
    if diff:
        shown = ", ".join(f"{k}: model {a!r} vs inferred {b!r}" for k, a, b in diff[:4])
        raise ConvertError(f"a config-less .pth cannot describe this model ({shown}); the original code would build "
                           "the wrong architecture from it. Use --to hf (config.json travels with the weights).")


def export_native(src, out_path, *, dtype=None, lora=None, force: bool = False) -> Path:
    """dtype None/"auto" -> float16, the original's format."""
    source = load_source(src, lora=lora)
    torch_dtype = export_dtype(dtype, torch.float16)
    sd = {k: v.to(torch_dtype).contiguous() for k, v in source.state_dict.items()}
    if source.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # same storage: saved once by torch.save
    check_representable(source, sd)
    with atomic_output(out_path, force) as tmp:
        torch.save(sd, tmp)
    return Path(out_path)
