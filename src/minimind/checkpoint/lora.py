"""MiniMind's LoRA files (the original layout, not PEFT): find, read and check, load into a model, save. The
adapter modules are model.lora's, re-exported: `minimind.lora` (this module) is the one place a user needs."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..model.keys import strip_prefixes
from ..model.lora import (  # noqa: F401 - re-exported: minimind.lora is this module
    LoRAAdapter,
    LoRALinear,
    apply_lora,
    lora_layers,
    merge_lora,
    merged_state_dict,
    square_linears,
    unmerge_lora,
)
from .native import read_torch_file

_KEY = re.compile(r"^(.+)\.lora\.([AB])\.weight$")


def read_adapter(model: nn.Module, path_or_state_dict) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """Read and check a MiniMind LoRA file (any era) or state_dict against `model` without changing it.

    -> (rank, {layer name: {"A": [r, in], "B": [out, r]}}). The adapter must cover exactly the model's square
    Linears with fitting shapes, otherwise a CheckpointError names the file and what does not fit.
    """
    config = getattr(model, "config", None)
    if isinstance(path_or_state_dict, dict):
        where, raw = "LoRA state_dict", path_or_state_dict
    else:
        path = resolve_lora_path(path_or_state_dict, hidden_size=getattr(config, "hidden_size", 512),
                                 use_moe=getattr(config, "use_moe", False))
        where, raw = str(path), read_torch_file(path)
    sd = strip_prefixes(raw)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in sd.items():
        if m := _KEY.match(key):
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            other.append(key)
    if not pairs:
        kind = " (it looks like a full model checkpoint)" if "model.embed_tokens.weight" in sd else ""
        raise CheckpointError(where, f"contains no LoRA tensors (`*.lora.A.weight` / `*.lora.B.weight`){kind}; "
                              f"first keys: {list(sd)[:4]}")
    if other:
        raise CheckpointError(where, f"mixes {len(other)} non-LoRA tensors (e.g. {other[:3]}) with the adapter; "
                              "a LoRA file holds only `.lora.A/B.weight` tensors")
    half = sorted(n for n, p in pairs.items() if len(p) != 2)
    if half:
        raise CheckpointError(where, f"has only one of A/B for {len(half)} layer(s), e.g. {half[0]}")
    ranks = {p["A"].shape[0] for p in pairs.values() if p["A"].dim() == 2}
    if len(ranks) != 1 or any(p["A"].dim() != 2 or p["B"].dim() != 2 for p in pairs.values()):
        raise CheckpointError(where, f"inconsistent adapter shapes (ranks found: {sorted(ranks)})")
    rank = ranks.pop()
    targets = lora_layers(model) or square_linears(model)
    model_hidden = getattr(config, "hidden_size", None) or next(iter(targets.values())).in_features
    for name, p in sorted(pairs.items()):
        layer = targets.get(name)
        if layer is None:
            continue  # reported below together with the other layer mismatches
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        if tuple(p["A"].shape) != want_a or tuple(p["B"].shape) != want_b:
            raise CheckpointError(where, f"rank {rank} adapter for hidden {p['A'].shape[1]}, model hidden is "
                                  f"{model_hidden} ({name}: A {tuple(p['A'].shape)}, B {tuple(p['B'].shape)}; "
                                  f"expected A {want_a}, B {want_b})")
    extra, missing = sorted(set(pairs) - set(targets)), sorted(set(targets) - set(pairs))
    if extra or missing:
        parts = [f"{len(extra)} adapter(s) for layers the model does not have (e.g. {extra[:2]})"] if extra else []
        if missing:
            parts.append(f"no adapter for {len(missing)} of the model's {len(targets)} LoRA layers "
                         f"(e.g. {missing[:2]}); a partial adapter would silently give wrong output")
        raise CheckpointError(where, f"rank {rank} adapter does not fit this model: " + "; ".join(parts))
    return rank, pairs


def load_lora(model: nn.Module, path_or_state_dict) -> nn.Module:
    """Load a LoRA file of any era into `model`, applying LoRA first if needed. Nothing in the model changes when
    the file does not fit (read_adapter checks it first)."""
    rank, pairs = read_adapter(model, path_or_state_dict)
    wrapped = lora_layers(model)
    if any(m.merged for m in wrapped.values()):
        raise RuntimeError("the model's LoRA is merged: call unmerge_lora(model) before loading another adapter")
    if not wrapped:
        apply_lora(model, rank)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.set_rank(rank)
            w = layer.weight
            layer.lora.A.weight.copy_(pairs[name]["A"].to(device=w.device, dtype=w.dtype))
            layer.lora.B.weight.copy_(pairs[name]["B"].to(device=w.device, dtype=w.dtype))
    return model


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write only the adapters, as minimind-3 does: `{name}.lora.A.weight`, `{name}.lora.B.weight`, fp16, CPU."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save (call apply_lora or load_lora first)")
    sd = {f"{name}.lora.{ab}.weight": getattr(layer.lora, ab).weight.detach().cpu().half()
          for name, layer in layers.items() for ab in ("A", "B")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def resolve_lora_path(name_or_path: str | Path, save_dir: str | Path = "out", hidden_size: int = 512,
                      use_moe: bool = False) -> Path:
    """An existing file as given, else the first existing place a MiniMind script of some era saved LoRA `name`
    (see minimind-compat.md, LoRA). Raises CheckpointError listing every path tried."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    tried = [given]
    if given.suffix not in (".pth", ".pt", ".bin") and len(given.parts) == 1:  # a bare name like lora_identity
        sized, base, moe = f"{name_or_path}_{hidden_size}", Path(save_dir), "_moe" if use_moe else ""
        for cand in (base / "lora" / f"{sized}{moe}.pth", base / f"{sized}{moe}.pth", base / "lora" / f"{sized}.pth",
                     base / f"{sized}.pth", base.parent / "out" / "lora" / f"{sized}.pth",
                     base / "lora" / f"{name_or_path}.pth", base / f"{name_or_path}.pth"):
            if cand not in tried:
                tried.append(cand)
            if cand.is_file():
                return cand
    raise CheckpointError(name_or_path, "LoRA file not found; tried: " + ", ".join(str(p) for p in tried))
