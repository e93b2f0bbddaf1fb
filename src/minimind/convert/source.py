"""What every export starts from: the (config, state_dict, tokenizer) of a checkpoint.

The state_dict keeps the source's own dtype (a native fp16 .pth stays fp16), so exports with `dtype="auto"`
are bit-exact copies of the weights. A LoRA is merged in fp32 and rounded once, to the export dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.default_model import default_model_dir
from ..checkpoint.loader import check_tokenizer_matches, load_tokenizer, read_checkpoint
from ..checkpoint.lora import load_lora, lora_layers, merged_state_dict
from ..checkpoint.spec import ModelSpec
from ..config import MiniMindConfig
from ..errors import CheckpointError
from ..model.core import MiniMindLM, build_on_meta
from ..model.keys import normalize_state_dict

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why and what to do instead."""


@dataclass
class Source:
    config: MiniMindConfig
    state_dict: dict[str, torch.Tensor]  # our (= HF Llama/Qwen3) names; lm_head omitted when tied
    tokenizer: Any | None  # transformers tokenizer, or None when none was found/given
    name: str  # for general.name / messages

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the weights: the most common one, fp32 if that is not a float type."""
        counts: dict[torch.dtype, int] = {}
        for t in self.state_dict.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        common = max(counts, key=counts.get)
        return common if common in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def export_dtype(dtype: str | torch.dtype | None, auto: torch.dtype) -> torch.dtype:
    if dtype in (None, "auto"):
        return auto
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose from auto, float32, float16, bfloat16")
    return DTYPES[dtype.lower()]


def load_source(src, *, tokenizer=None, lora=None, need_tokenizer: bool = False) -> Source:
    """src: a checkpoint path (None = the embedded default model), a loaded MiniMindForCausalLM, a ModelSpec (its
    model, tokenizer and lora_weight) or a Source (used as it is). tokenizer: an object, a folder/GGUF path, or
    None (the source's own, if it has one)."""
    if isinstance(src, ModelSpec):
        src, tokenizer, lora = src.model, src.tokenizer, src.lora_weight
    if isinstance(src, Source):
        source = src
    elif isinstance(src, torch.nn.Module):
        origin = str(getattr(src, "name_or_path", "") or "")
        source = _read(src.config, merged_state_dict(src), lora, tokenizer, Path(origin) if origin else None,
                       Path(origin).stem or "minimind")
    else:
        path = default_model_dir() if src is None else Path(src).expanduser()
        if not path.exists():
            raise CheckpointError(path, "does not exist")
        source = _read(*read_checkpoint(path), lora, tokenizer, path, path.stem if path.is_file() else path.name)
    if source.tokenizer is None and need_tokenizer:
        what = src if isinstance(src, (str, Path)) else "the model"
        raise ConvertError(f"{what} has no tokenizer next to the weights: pass --tokenizer DIR (the folder with "
                           "tokenizer.json and tokenizer_config.json; for the original layout that is the "
                           "repository's `model/`)")
    return source


def _read(config: MiniMindConfig, sd: dict, lora, tokenizer, path: Path | None, name: str) -> Source:
    sd = {k: v.detach().cpu() for k, v in normalize_state_dict(sd, config).items()}
    if lora is not None:
        sd = _merge_lora(config, sd, lora)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    elif tokenizer is None and path is not None and _has_tokenizer(path):
        tokenizer = load_tokenizer(path)
    if tokenizer is not None:
        check_tokenizer_matches(tokenizer, config)
    return Source(config, sd, tokenizer, name)


def _has_tokenizer(path: Path) -> bool:
    """An HF folder with tokenizer files and a GGUF carry one; a bare weights file does not."""
    if path.is_dir():
        return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) or any(
            path.glob("*.gguf"))
    return path.suffix == ".gguf"


def _merge_lora(config: MiniMindConfig, sd: dict, lora) -> dict:
    """W + B A for every adapter, in fp32; merged weights stay fp32 so the export dtype rounds them once."""
    model = build_on_meta(MiniMindLM, config)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    model.tie_embeddings()
    load_lora(model, lora)  # CheckpointError naming the file if it does not fit
    adapted = {f"{name}.weight" for name in lora_layers(model)}
    return {k: v if k in adapted or k not in sd else v.to(sd[k].dtype) for k, v in merged_state_dict(model).items()}
