"""Helpers shared by the test_convert_* modules (no tests here): tiny random models with MiniMind's real
tokenizers, saved as the original's fp16 .pth, and a greedy reference decoder."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_model, tokenizer_dir

# era -> (family, use_moe, tokenizer folder under ../shared/minimind-tokenizers)
ERAS = {
    "minimind2": ("minimind2", False, "minimind2"),
    "2510": ("minimind2", False, "minimind2-2510"),
    "minimind3": ("minimind3", False, "minimind-3"),
    "minimind3-moe": ("minimind3", True, "minimind-3"),
    "minimind2-moe": ("minimind2", True, "minimind2-2510"),
}
PROMPT = [{"role": "user", "content": "你好，请介绍一下你自己。 Hello, who are you?  It's 2026:   tabs\there!"}]


def era_model(era: str, seed: int = 0):
    """A tiny random model of `era` with the real 6400-token vocabulary. The final norm weight is scaled up so
    greedy decoding has clear margins (>= 0.4 logits for PROMPT: fp16 rounding in llama.cpp must not flip a
    token) while the 8 greedy tokens still differ from each other (a test that repeats one token proves little)."""
    family, moe, _ = ERAS[era]
    model = tiny_model(family, moe, seed=seed, vocab_size=6400, hidden_size=64, num_hidden_layers=2)
    with torch.no_grad():
        model.model.norm.weight.mul_(30)
    return model


def save_native(model, path: Path) -> Path:
    """The original's format: fp16 state_dict with both embed and (tied) lm_head keys."""
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def native_era(tmp_path: Path, era: str) -> tuple[Path, Path]:
    """(native .pth, tokenizer folder) for `era`; skips when ../shared is absent."""
    tok = tokenizer_dir(ERAS[era][2])
    return save_native(era_model(era), tmp_path / f"full_sft_{era}.pth"), tok


def greedy(model, ids: list[int], steps: int = 8) -> list[int]:
    """Plain greedy decoding without a cache (the reference)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out[len(ids):]


def state_dicts_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bit-exact comparison, dtype included)."""
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in set(a) & set(b) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    return bad
