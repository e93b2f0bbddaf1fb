"""`--to peft`: a MiniMind LoRA file as a PEFT LoRA adapter for the `--to hf` export of its base model, which
transformers+peft and vLLM (`--enable-lora --lora-modules name=DIR`) apply at run time, several per base model.

MiniMind's y = W x + B(A x) is PEFT's LoRA with scaling lora_alpha / r = 1 (lora_alpha = r), no dropout, no bias.
The layer names of every `--to hf` architecture are ours (`model.layers.i.self_attn.q_proj`), so the tensors are
renamed only by PEFT's wrapping: `base_model.model.{layer}.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.loader import read_checkpoint
from ..checkpoint.lora import read_adapter
from ..model.core import MiniMindLM, build_on_meta
from .output import atomic_output, write_json
from .source import export_dtype


def adapter_config(base: str, rank: int, targets: list[str]) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": None,
            "inference_mode": True, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def export_peft(lora, out_dir, *, base, dtype=None, force: bool = False) -> Path:
    """Write adapter_config.json and adapter_model.safetensors. `lora`: a MiniMind LoRA file (or state_dict);
    `base`: the base model (any checkpoint; written as base_model_name_or_path, so pass the folder the adapter is
    served with). The adapter is checked against the base first. dtype None/"auto" = float32."""
    from safetensors.torch import save_file

    config, _ = read_checkpoint(base)  # shapes of the layers the adapter must fit
    rank, pairs = read_adapter(build_on_meta(MiniMindLM, config), lora)
    torch_dtype = export_dtype(dtype, torch.float32)
    tensors = {f"base_model.model.{name}.lora_{ab}.weight": pair[ab].to(torch_dtype).contiguous().clone()
               for name, pair in sorted(pairs.items()) for ab in ("A", "B")}
    targets = sorted({name.rsplit(".", 1)[-1] for name in pairs})
    with atomic_output(out_dir, force, folder=True) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", adapter_config(str(base), rank, targets))
    return Path(out_dir)
