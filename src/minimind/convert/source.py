"""What every export starts from: (config, state_dict, tokenizer) of a path or a loaded model, and safe writing.

The state_dict keeps the source's own dtype (a native fp16 .pth stays fp16), so exports with `dtype="auto"`
are bit-exact copies of the weights. A LoRA is merged in fp32 and rounded once, to the export dtype.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..config import MiniMindConfig


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
        """The storage dtype of the weights (the most common floating dtype)."""
        counts: dict[torch.dtype, int] = {}
        for t in self.state_dict.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        return max(counts, key=counts.get)


def resolve_export_dtype(dtype: str | torch.dtype | None, source: Source) -> torch.dtype:
    if dtype in (None, "auto"):
        return source.dtype if source.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose from auto, float32, float16, bfloat16")
    return DTYPES[dtype.lower()]


def load_source(model_or_path, *, tokenizer=None, lora=None, need_tokenizer: bool = False) -> Source:
    """Read a checkpoint path (anything `load_model` reads) or take a loaded MiniMindForCausalLM.

    tokenizer: a tokenizer object, a folder/GGUF path, or None (taken from the source folder/GGUF if it has one).
    lora: an original LoRA file merged into the weights first (its fit is checked by `load_lora`).
    """
    from ..checkpoint.loader import check_tokenizer_matches, load_tokenizer, read_checkpoint
    from ..model.keys import normalize_state_dict

    if isinstance(model_or_path, torch.nn.Module):
        config = model_or_path.config
        from ..model.lora import lora_layers, merged_state_dict

        sd = merged_state_dict(model_or_path) if lora_layers(model_or_path) else dict(model_or_path.state_dict())
        name = Path(str(getattr(model_or_path, "name_or_path", "") or "minimind")).stem or "minimind"
        src_path = Path(getattr(model_or_path, "name_or_path", "") or ".")
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
    tok = _resolve_tokenizer(tokenizer, src_path, load_tokenizer)
    if tok is not None:
        check_tokenizer_matches(tok, config)
    elif need_tokenizer:
        raise ConvertError(f"{model_or_path if not isinstance(model_or_path, torch.nn.Module) else 'the model'} has "
                           "no tokenizer next to the weights: pass --tokenizer DIR (the folder with tokenizer.json "
                           "and tokenizer_config.json; for the original layout that is the repository's `model/`)")
    return Source(config, sd, tok, name)


def _resolve_tokenizer(tokenizer, src_path: Path, load_tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    folder_has = src_path.is_dir() and any((src_path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if folder_has or src_path.suffix == ".gguf" or (src_path.is_dir() and any(src_path.glob("*.gguf"))):
        return load_tokenizer(src_path)
    return None


def _merge_lora(config: MiniMindConfig, sd: dict, lora) -> dict:
    """W + B A for every adapter, in fp32; merged weights stay fp32 so the export dtype rounds them once."""
    from ..model import MiniMindForCausalLM
    from ..checkpoint.lora import load_lora, merged_state_dict

    dtypes = {k: v.dtype for k, v in sd.items()}
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_lora(model, lora)  # CheckpointError naming the file if it does not fit
    merged = merged_state_dict(model)
    changed = {k[: -len(".lora.A.weight")] + ".weight" for k in _lora_keys(lora, model)}
    return {k: v if k in changed else v.to(dtypes.get(k, v.dtype)) for k, v in merged.items()}


def _lora_keys(lora, model) -> list[str]:
    from ..model.lora import lora_layers

    return [f"{name}.lora.A.weight" for name in lora_layers(model)]


# ------------------------------------------------------------------------------------------------ safe output
def check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not force:
        kind = "folder" if dst.is_dir() else "file"
        raise ConvertError(f"{dst}: {kind} exists; pass --force (force=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_file(dst: Path, force: bool = False):
    """Yield a temp path next to `dst`; rename it to `dst` only if the block finished (no half-written file)."""
    dst = Path(dst)
    check_destination(dst, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool = False):
    """Yield a temp folder next to `dst`; it replaces `dst` only if the block finished."""
    dst = Path(dst)
    check_destination(dst, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """A rich progress bar on stderr (transient); yields advance(n=1). Silent when disabled or not a terminal."""
    import sys

    if not enabled or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.update(task, advance=n)
