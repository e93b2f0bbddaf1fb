"""Hugging Face model folders, read without remote code: `model_type: minimind` (MiniMind's custom export of any
era, and ours), `LlamaForCausalLM` (MiniMind2/2510's llama export, any Llama) and `Qwen3ForCausalLM` /
`Qwen3MoeForCausalLM` (minimind-3; per-expert or fused experts), and `Qwen2MoeForCausalLM` (MiniMind2 MoE as
`convert --arch qwen2_moe` writes it). HF configs are parsed by transformers' own config classes, so their defaults
and both `rope_scaling`/`rope_parameters` forms are HF's.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..config import MiniMindConfig
from ..errors import CheckpointError, reason
from ..model.core import MiniMindLM, build_on_meta
from ..model.keys import explain_mismatch, is_tied, normalize_state_dict
from . import detect as fmt
from .native import read_weights_file

_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def read_hf_folder(path: Path, kind: str, dtype: torch.dtype | None = None
                   ) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """(config, state_dict with our parameter names) of an HF folder of the flavour `kind` (detect.HF_*), floating
    tensors cast to `dtype` one by one as they are read (None keeps the files' dtype)."""
    cfg_path = Path(path) / "config.json"
    raw = json.loads(cfg_path.read_text())  # detect() has parsed it: a JSON object
    weights_path, sd = read_weights(Path(path), dtype)
    try:
        config = _minimind_config(raw, sd, cfg_path) if kind == fmt.HF_MINIMIND else _hf_config(raw, sd, kind,
                                                                                                 cfg_path)
    except CheckpointError:
        raise
    except Exception as exc:  # a field of the wrong type or value (a string size, zero heads, ...)
        raise CheckpointError(cfg_path, f"describes no valid model ({reason(exc)}): re-download or fix it") from None
    if kind in (fmt.HF_QWEN3_MOE, fmt.HF_QWEN2_MOE):
        sd = split_fused_experts(sd, weights_path)
    if kind == fmt.HF_QWEN2_MOE:
        sd = from_qwen2_moe(config, sd, weights_path)
    # names and shapes against a meta-device MiniMindLM (MiniMindForCausalLM's keys), so an error names both files
    problem = explain_mismatch(normalize_state_dict(sd, config), build_on_meta(MiniMindLM, config), hint=False)
    if problem:
        raise CheckpointError(weights_path, f"does not match {cfg_path.name}: {problem} The folder is "
                              "inconsistent: re-download or re-export it (config.json and the weights must come "
                              "from the same model).")
    return config, sd


def read_weights(folder: Path, dtype: torch.dtype | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file named in errors, state_dict) of single or sharded safetensors / pytorch_model.bin."""
    candidate = next((folder / name for name in _WEIGHT_FILES if (folder / name).is_file()), None)
    if candidate is None:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".gguf"))
        raise CheckpointError(folder, "has config.json but no weights file (expected one of "
                              f"{', '.join(_WEIGHT_FILES)}; found {found or 'none'}). Download the weights too "
                              "(for a git clone: `git lfs pull`).")
    if candidate.name.endswith(".index.json"):
        try:
            weight_map = json.loads(candidate.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointError(candidate, f"is not a valid shard index (needs a `weight_map`): {exc}") from None
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(shard_path, f"is listed in {candidate.name} but missing: download all shards")
            sd.update(read_weights_file(shard_path, dtype))
        return candidate, sd
    return candidate, read_weights_file(candidate, dtype)


def split_fused_experts(sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """transformers-5 Qwen3-MoE: experts.gate_up_proj [E, 2I, H] = cat(stack(gate), stack(up), dim=1) and
    experts.down_proj [E, H, I] -> per-expert experts.{e}.{gate,up,down}_proj.weight (transformers-4 names)."""
    out = {}
    for key, value in sd.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = value
            continue
        prefix, which = m.groups()
        if value.dim() != 3:
            raise CheckpointError(source, f"`{key}` has shape {tuple(value.shape)}; fused experts must be 3-D")
        if which == "gate_up_proj" and value.shape[1] % 2:
            raise CheckpointError(source, f"`{key}` has an odd middle dimension {value.shape[1]} (expected 2*I)")
        # gate first, as Qwen3MoeExperts.forward splits; down [E, H, I]: each [H, I] is nn.Linear(I, H).weight
        parts = zip(("gate_proj", "up_proj"), value.chunk(2, dim=1)) if which == "gate_up_proj" else [(which, value)]
        for name, stacked in parts:
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{name}.weight"] = stacked[e]
    return out


def _minimind_config(raw: dict, sd: dict, cfg_path: Path) -> MiniMindConfig:
    """Custom `model_type: minimind` config.json of any era (or ours). Old files carry no `family`: the weights
    decide it (per-head q_norm exists only in minimind-3); every other field in config.json wins."""
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    has_qk_norm = any(k.endswith("self_attn.q_norm.weight") for k in sd)
    family = "minimind3" if has_qk_norm else "minimind2"
    if fields.get("family", family) != family:
        raise CheckpointError(cfg_path, f"says family {fields['family']!r} but the weights are {family} "
                              f"({'with' if has_qk_norm else 'without'} per-head q_norm/k_norm)")
    fields.update(family=family, tie_word_embeddings=is_tied(sd, fields.get("tie_word_embeddings")))
    try:
        return MiniMindConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(cfg_path, f"invalid MiniMind config ({exc}): re-download or fix it") from None


def _hf_config(raw: dict, sd: dict, kind: str, cfg_path: Path) -> MiniMindConfig:  # Llama / Qwen3 / Qwen3-MoE
    from transformers import AutoConfig

    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    try:
        hf = AutoConfig.for_model(raw["model_type"], **fields)
    except Exception as exc:  # transformers validation raises several types; name the file
        raise CheckpointError(cfg_path, f"transformers could not parse it: {type(exc).__name__}: {exc}") from None
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            raise CheckpointError(cfg_path, f"{flag}=true: linear layers with biases are not supported (MiniMind, "
                                  "Llama-as-exported and Qwen3 have none). Use a checkpoint without biases.")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    theta, scaling = _rope(hf, head_dim, cfg_path)
    cfg = dict(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
               num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
               head_dim=head_dim, intermediate_size=hf.intermediate_size, hidden_act=hf.hidden_act,
               max_position_embeddings=hf.max_position_embeddings, rms_norm_eps=hf.rms_norm_eps,
               rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=is_tied(sd, hf.tie_word_embeddings),
               bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)
    layer_types = getattr(hf, "layer_types", None) or []
    if kind != fmt.HF_LLAMA and getattr(hf, "sliding_window", None) and "sliding_attention" in layer_types:
        raise CheckpointError(cfg_path, f"sliding-window attention is active (sliding_window={hf.sliding_window} on "
                              f"{layer_types.count('sliding_attention')} layer(s)); only full attention is "
                              "supported. Set use_sliding_window=false if the model was not trained with it.")
    if kind in (fmt.HF_QWEN3_MOE, fmt.HF_QWEN2_MOE):
        step, dense_only = getattr(hf, "decoder_sparse_step", 1) or 1, getattr(hf, "mlp_only_layers", None) or []
        dense = [i for i in range(hf.num_hidden_layers) if i in dense_only or (i + 1) % step]
        if dense:
            raise CheckpointError(cfg_path, f"layers {dense} are dense MLP layers (mlp_only_layers / "
                                  f"decoder_sparse_step={step}); mixing dense and MoE layers is not supported: every "
                                  "layer must be MoE.")
        cfg.update(use_moe=True, num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                   moe_intermediate_size=hf.moe_intermediate_size, norm_topk_prob=hf.norm_topk_prob)
    if kind == fmt.HF_QWEN2_MOE:
        cfg.update(_qwen2_moe_fields(hf, cfg_path))
    return llama_or_qwen3_config(cfg_path, qwen3=kind not in (fmt.HF_LLAMA, fmt.HF_QWEN2_MOE), **cfg)


def _qwen2_moe_fields(hf, cfg_path: Path) -> dict:
    """MiniMind2 MoE fields of a Qwen2-MoE config: its one shared expert of width S is n = S / intermediate_size
    MiniMind shared experts (one wider SwiGLU computes the sum of its row blocks)."""
    shared = hf.shared_expert_intermediate_size
    if not shared:
        raise CheckpointError(cfg_path, "Qwen2-MoE without a shared expert is not supported")
    if hf.norm_topk_prob and hf.num_experts_per_tok == 1:  # MiniMind2 keeps the softmax weight of a top-1 expert
        raise CheckpointError(cfg_path, "norm_topk_prob with one expert per token is not supported for Qwen2-MoE")
    n = shared // hf.intermediate_size if shared % hf.intermediate_size == 0 else 1
    return {"intermediate_size": shared // n, "n_shared_experts": n}


def from_qwen2_moe(config: MiniMindConfig, sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The inverse of `convert --arch qwen2_moe`: Qwen2-MoE scales its shared expert by sigmoid(gate(x)), which is
    MiniMind2's ungated one only for a zero gate (0.5: the down_proj is halved, exactly); q/k/v biases must be 0."""
    out = {k: v for k, v in sd.items() if not k.endswith(("_proj.bias", "shared_expert_gate.weight"))
           and ".mlp.shared_expert." not in k}
    nonzero = [k for k, v in sd.items() if k.endswith(("_proj.bias", "shared_expert_gate.weight")) and v.any()]
    if nonzero:
        raise CheckpointError(source, f"`{nonzero[0]}` is not zero: only Qwen2-MoE models with zero q/k/v biases "
                              "and a zero shared-expert gate (as `minimind convert --arch qwen2_moe` writes) are "
                              "supported")
    n, size = config.n_shared_experts, config.intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            whole = sd.get(f"{p}shared_expert.{proj}.weight")
            if whole is None or whole.shape[dim] != n * size:
                raise CheckpointError(source, f"`{p}shared_expert.{proj}.weight` is missing or not {n * size} wide")
            for j, part in enumerate(whole.split(size, dim=dim)):
                out[f"{p}shared_experts.{j}.{proj}.weight"] = part / 2 if proj == "down_proj" else part
    return out


def llama_or_qwen3_config(source: Path, qwen3: bool, **fields) -> MiniMindConfig:
    """MiniMindConfig of a Llama or Qwen3(-MoE) checkpoint (HF folder or GGUF): RMSNorm casts before the weight
    multiply as in Llama, Qwen3 adds per-head q/k norm, and MoE layers have no shared expert."""
    fields.update(family="minimind3" if qwen3 else "minimind2", qk_norm=qwen3, rms_norm_fp32_weight=False)
    if fields.get("use_moe"):
        fields.setdefault("n_shared_experts", 0)
    try:
        return MiniMindConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(source, f"{exc}: re-download or fix the model's configuration") from None


def _rope(hf, head_dim: int, cfg_path: Path) -> tuple[float, dict | None]:  # (rope_theta, our rope_scaling)
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params and getattr(hf, "rope_scaling", None):  # older transformers layouts
        params = dict(hf.rope_scaling)
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    params.pop("type", None)
    if kind == "default":
        return float(theta), None
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(cfg_path, "partial_rotary_factor != 1 is not supported")
    if kind != "yarn":
        return float(theta), {**params, "rope_type": kind}  # llama3/linear/dynamic: rope.py runs HF's own code
    return float(theta), hf_yarn(params, hf.max_position_embeddings, head_dim, theta, cfg_path)


def hf_yarn(params: dict, max_pos: int, head_dim: int, theta: float, source: Path) -> dict:
    """HF YaRN expressed in MiniMind's yarn dict. Both compute f' = f(1 - r + r/s) over a floor/ceil ramp; HF
    derives the attention factor 0.1*ln(s)+1 (or the mscale ratio) when absent, MiniMind's dict must carry it."""
    orig = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor") or max_pos / orig
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        ms, ms_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
    high = math.ceil(head_dim * math.log(orig / (beta_slow * 2 * math.pi)) / (2 * math.log(theta)))
    # Cases where MiniMind's formula differs from HF's: it only scales when max_pos > original context, it clamps
    # the ramp end at dim/2-1 (HF at dim-1), and it always truncates.
    if max_pos <= orig or high > head_dim // 2 - 1 or params.get("truncate", True) is False:
        return {**{k: v for k, v in params.items() if k not in ("type", "rope_theta")}, "rope_type": "hf_yarn"}
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(orig),
            "beta_fast": float(beta_fast), "beta_slow": float(beta_slow),
            "attention_factor": float(attention_factor)}
