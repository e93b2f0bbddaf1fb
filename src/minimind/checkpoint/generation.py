"""Sampling defaults that fit the model, in this order: what the model's own files recommend
(`generation_config.json` of an HF folder, the `general.sampling.*` keys of a GGUF), the embedded default model's
model card, a MiniMind release's documented defaults, and last llama.cpp's defaults."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .default_model import is_default_model


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 0.8  # with no other source: llama.cpp's defaults
    top_p: float = 0.95
    top_k: int = 40  # 0 = off
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    source: str = "llama.cpp's defaults"

    def describe(self) -> str:
        """'temperature 0.2, top_p 0.9 (SmolLM2-135M-Instruct's model card)': for --help and the web UIs."""
        parts = [f"temperature {self.temperature:g}", f"top_p {self.top_p:g}"]
        parts += [f"top_k {self.top_k}"] if self.top_k else []
        parts += [f"min_p {self.min_p:g}"] if self.min_p else []
        parts += [f"repetition_penalty {self.repetition_penalty:g}"] if self.repetition_penalty != 1.0 else []
        return f"{', '.join(parts)} ({self.source})"


# SmolLM2-135M-Instruct's model card samples with temperature 0.2, top_p 0.9.
SMOLLM2_CARD = SamplingDefaults(0.2, 0.9, 0, 0.0, 1.0, "SmolLM2-135M-Instruct's model card")


def minimind_release(config) -> SamplingDefaults:
    """eval_llm.py's defaults (temperature 0.85; top_p 0.85, minimind-3 0.95) with HF generate's top_k 50."""
    top_p = 0.95 if config.family == "minimind3" else 0.85
    return SamplingDefaults(0.85, top_p, 50, 0.0, 1.0, f"{config.era.removesuffix(' MoE')} release defaults")


def from_generation_config(folder: Path) -> SamplingDefaults | None:
    """The sampling fields of an HF folder's generation_config.json (absent fields: HF's own defaults)."""
    path = folder / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not any(k in data for k in ("temperature", "top_p", "top_k", "do_sample")):
        return None
    try:
        found = SamplingDefaults(float(data.get("temperature", 1.0)), float(data.get("top_p", 1.0)),
                                 int(data.get("top_k", 50) or 0), float(data.get("min_p") or 0.0),
                                 float(data.get("repetition_penalty", 1.0)), f"{path.name} of the model")
    except (TypeError, ValueError):
        return None
    return replace(found, temperature=0.0) if data.get("do_sample") is False else found


_GGUF_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
              "top_k": "general.sampling.top_k", "min_p": "general.sampling.min_p",
              "repetition_penalty": "general.sampling.penalty_repeat"}


def from_gguf(path: Path) -> SamplingDefaults | None:
    """The `general.sampling.*` keys of a GGUF file, the ones absent keep llama.cpp's defaults."""
    from .gguf_index import GGUFIndex

    try:
        fields = GGUFIndex(path).fields
    except (OSError, ValueError):
        return None
    found = {}
    for name, key in _GGUF_KEYS.items():
        field = fields.get(key)
        if field is not None:
            found[name] = type(getattr(SamplingDefaults, name))(field.contents())
    return replace(SamplingDefaults(), **found, source=f"{path.name}'s general.sampling keys") if found else None


def sampling_defaults(path: str | Path | None, config) -> SamplingDefaults:
    """The defaults for the model at `path` (a folder, a GGUF file, a .pth; None: unknown) with this config."""
    path = Path(path) if path is not None else None
    if path is not None and path.is_dir():
        found = from_generation_config(path)
        if found is not None:
            return found
    if path is not None and is_default_model(path):
        return SMOLLM2_CARD
    if path is not None and path.suffix == ".gguf" and path.is_file():
        found = from_gguf(path)
        if found is not None:
            return found
    if config.vocab_size == 6400:  # a MiniMind tokenizer: one of the releases or a model trained with its code
        return minimind_release(config)
    return SamplingDefaults()
