"""Writing exports: the destination replaced atomically, a progress bar, the metadata files of a model folder."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..config import MiniMindConfig
from .source import ConvertError, Source

_V5_ONLY = ("backend", "is_local", "local_files_only", "model_specific_special_tokens", "name_or_path",
            "auto_map", "processor_class")


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
        make_readable(tmp)
        if dst.exists():  # os.replace cannot put a file over a folder or a folder over anything
            os.replace(dst, old)
        os.replace(tmp, dst)
    finally:
        for leftover in (work, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def make_readable(path: Path) -> None:
    """Folders 0755 and files 0644, minus the umask: mkdtemp creates 0700 and some writers 0600, and an export is
    often read by another user (a server container)."""
    mask = os.umask(0o022)  # reading the umask means setting it: restored at once
    os.umask(mask)
    path = Path(path)
    for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
        if not p.is_symlink():
            p.chmod((0o755 if p.is_dir() else 0o644) & ~mask)


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool = True):
    """A transient rich progress bar on stderr; yields advance(n=1). Silent when disabled or not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.update(task, advance=n)


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template; of named templates, the default one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return template


def generation_config(config: MiniMindConfig) -> dict:
    out = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    if config.vocab_size == 6400:  # eval_llm.py of each era
        out.update(do_sample=True, temperature=0.85, top_p=0.95 if config.family == "minimind3" else 0.85, top_k=50)
    return out


def write_metadata(folder: Path, config_json: dict, source: Source) -> None:
    write_json(folder / "config.json", config_json)
    write_json(folder / "generation_config.json", generation_config(source.config))
    if source.tokenizer is not None:
        save_tokenizer(source.tokenizer, folder)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, then tokenizer_config.json rewritten so that transformers 4.x and 5.x both read it.

    transformers 5 saves `tokenizer_class: TokenizersBackend` (unknown to 4.x: minimind issue #578) and a list in
    `extra_special_tokens` (4.x expects a dict): like the original converter, write `PreTrainedTokenizerFast` and
    `{}`, the extra specials going to `additional_special_tokens`, which both read. The chat template goes both
    into tokenizer_config.json (4.x) and chat_template.jinja (5.x prefers the file)."""
    tokenizer.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list) and extra:
        cfg["additional_special_tokens"] = extra
    for key in _V5_ONLY:
        cfg.pop(key, None)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", extra_special_tokens={}, add_bos_token=False,
               add_eos_token=False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    template = chat_template(tokenizer)
    if template:
        cfg["chat_template"] = template
        (folder / "chat_template.jinja").write_text(template)
    write_json(cfg_path, cfg)
    write_json(folder / "special_tokens_map.json",
               {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)})
