"""What every export starts from: (config, state_dict, tokenizer) of a path or a loaded model, and safe writing.

The state_dict keeps the source's own dtype (a native fp16 .pth stays fp16), so exports with `dtype="auto"`
are bit-exact copies of the weights. A LoRA is merged in fp32 and rounded once, to the export dtype.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MiniMindConfig
from ..errors import CheckpointError


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why and what to do instead."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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
    """The torch dtype a `dtype` argument names; None and "auto" mean `auto`."""
    if dtype in (None, "auto"):
        return auto
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose from auto, float32, float16, bfloat16")
    return DTYPES[dtype.lower()]


def load_source(model_or_path, *, tokenizer=None, lora=None, need_tokenizer: bool = False) -> Source:
    """Read a checkpoint path (anything `load_model` reads; None = the embedded default model) or take a loaded
    MiniMindForCausalLM. tokenizer: an object, a folder/GGUF path, or None (the source's own, if it has one)."""
    from ..checkpoint.loader import check_tokenizer_matches, read_checkpoint
    from ..model.keys import normalize_state_dict
    from ..model.lora import merged_state_dict

    if model_or_path is None:
        from ..checkpoint.default_model import default_model_dir

        model_or_path = default_model_dir()
    if isinstance(model_or_path, torch.nn.Module):
        config, sd = model_or_path.config, merged_state_dict(model_or_path)
        origin = str(getattr(model_or_path, "name_or_path", "") or "")
        src_path, name = Path(origin or "."), Path(origin).stem or "minimind"
    else:
        src_path = Path(model_or_path).expanduser()
        if not src_path.exists():
            raise CheckpointError(src_path, "does not exist")
        config, sd = read_checkpoint(src_path)
        name = src_path.stem if src_path.is_file() else src_path.name
    sd = {k: v.detach().cpu() for k, v in normalize_state_dict(sd, config).items()}
    if lora is not None:
        sd = _merge_lora(config, sd, lora)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    tok = _tokenizer(tokenizer, src_path)
    if tok is not None:
        check_tokenizer_matches(tok, config)
    elif need_tokenizer:
        what = "the model" if isinstance(model_or_path, torch.nn.Module) else model_or_path
        raise ConvertError(f"{what} has no tokenizer next to the weights: pass --tokenizer DIR (the folder with "
                           "tokenizer.json and tokenizer_config.json; for the original layout that is the "
                           "repository's `model/`)")
    return Source(config, sd, tok, name)


def _tokenizer(tokenizer, src_path: Path):
    from ..checkpoint.loader import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    has_files = src_path.is_dir() and any((src_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if has_files or src_path.suffix == ".gguf" or (src_path.is_dir() and any(src_path.glob("*.gguf"))):
        return load_tokenizer(src_path)
    return None


def _merge_lora(config: MiniMindConfig, sd: dict, lora) -> dict:
    """W + B A for every adapter, in fp32; merged weights stay fp32 so the export dtype rounds them once."""
    from ..checkpoint.lora import load_lora
    from ..model import MiniMindForCausalLM
    from ..model.lora import lora_layers, merged_state_dict

    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_lora(model, lora)  # CheckpointError naming the file if it does not fit
    adapted = {f"{name}.weight" for name in lora_layers(model)}
    return {k: v if k in adapted or k not in sd else v.to(sd[k].dtype) for k, v in merged_state_dict(model).items()}


@contextlib.contextmanager
def atomic_output(dst: Path, force: bool = False, *, folder: bool = False):
    """Yield a temporary file (or folder) path next to `dst` that replaces `dst` only if the block finishes:
    a failed export leaves no half-written output behind and keeps the old one."""
    dst = Path(dst)
    if dst.exists() and not force:
        kind = "folder" if dst.is_dir() else "file"
        raise ConvertError(f"{dst}: {kind} exists; pass --force (force=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    tmp, old = (work if folder else work / dst.name), work.with_suffix(".old")
    try:
        yield tmp
        if dst.exists():  # os.replace cannot put a file over a folder or a folder over anything
            os.replace(dst, old)
        os.replace(tmp, dst)
    finally:
        for leftover in (work, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """A rich progress bar on stderr (transient); yields advance(n=1). Silent when disabled or not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.update(task, advance=n)
