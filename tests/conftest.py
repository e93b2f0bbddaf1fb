"""Shared test helpers: tiny random models of every era and the path to ../shared."""
from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from a second thread, and on a shared 2-core machine every OpenMP region stalls
# while a neighbour holds a core (tests ran 10-25x slower). Subprocesses started by tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZERS = SHARED / "minimind-tokenizers"


def tokenizer_dir(era: str) -> Path:
    """Real MiniMind tokenizer folder ('minimind2', 'minimind2-2510', 'minimind-3'); skips when ../shared is absent."""
    path = TOKENIZERS / era
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"../shared/minimind-tokenizers/{era} not found (a fresh clone without ../shared); CI has it")
    return path


def tiny_config(family: str = "minimind2", use_moe: bool = False, **overrides):
    from minimind.config import MiniMindConfig

    base = dict(family=family, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2 if family == "minimind2" else 4, use_moe=use_moe)
    base.update(overrides)
    return MiniMindConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1) so each code path changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model


def tiny_model(family: str = "minimind2", use_moe: bool = False, seed: int = 0, **overrides):
    from minimind.model import MiniMindForCausalLM

    torch.manual_seed(seed)
    return randomize_(MiniMindForCausalLM(tiny_config(family, use_moe, **overrides)), seed).eval()


ERAS = [("minimind2", False), ("minimind2", True), ("minimind3", False), ("minimind3", True)]
ERA_IDS = ["minimind2", "minimind2-moe", "minimind3", "minimind3-moe"]
