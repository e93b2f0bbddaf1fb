"""State_dict keys and shapes: prefixes stripped, the architecture inferred, a mismatch explained (pure
functions on tensors; reading files is the checkpoint package's job)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import MiniMindConfig
from ..errors import CheckpointError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
_WRAPPERS = re.compile(r"^(?:module\.|_orig_mod\.)+")
_LEGACY_MARKERS = ("tok_embeddings.weight", "attention.wq.weight", "feed_forward.w1.weight")


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    return {_WRAPPERS.sub("", key): value for key, value in state_dict.items()}


def is_legacy(state_dict: dict) -> bool:
    return any(k.endswith(m) for k in state_dict for m in _LEGACY_MARKERS)


LEGACY_MESSAGE = ("is a legacy MiniMind checkpoint from before 2025-04-26 (`MiniMindLM`: keys like "
                  "`tok_embeddings`, `attention.wq`, `feed_forward.w1`). That architecture used interleaved complex "
                  "RoPE and different module names; the MiniMind README itself says these weights can no longer be "
                  "loaded. Use a MiniMind2 / 2510 / minimind-3 checkpoint instead.")


def infer_config(state_dict: dict[str, torch.Tensor], source: Path | str = "state_dict", **overrides) -> MiniMindConfig:
    """Derive the architecture from key names and shapes (see minimind-compat.md, 'Native .pth')."""
    sd = strip_prefixes(state_dict)
    if is_legacy(sd):
        raise CheckpointError(source, LEGACY_MESSAGE)
    if "model.embed_tokens.weight" not in sd:
        raise CheckpointError(source, "has no `model.embed_tokens.weight`: not a MiniMind/Llama/Qwen3 state_dict "
                              f"(first keys: {list(sd)[:5]})")
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers:
        raise CheckpointError(source, "has no `model.layers.N.*` tensors")
    if layers != list(range(len(layers))):
        raise CheckpointError(source, f"layer indices are not contiguous: {layers}")
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    use_moe = any(".mlp.experts." in k for k in sd)
    for key in (attn + "q_proj.weight", attn + "k_proj.weight", attn + "o_proj.weight",
                *(() if use_moe else (mlp + "gate_proj.weight",))):
        if key not in sd:
            raise CheckpointError(source, f"missing tensor `{key}`")
    q_out, k_out = sd[attn + "q_proj.weight"].shape[0], sd[attn + "k_proj.weight"].shape[0]
    v3 = attn + "q_norm.weight" in sd
    if v3:
        head_dim = sd[attn + "q_norm.weight"].shape[0]
        heads = q_out // head_dim
    else:  # MiniMind2/2510 always have 8 query heads and head_dim = hidden / heads
        heads = overrides.pop("num_attention_heads", 8)
        head_dim = q_out // heads
    cfg: dict = dict(family="minimind3" if v3 else "minimind2", vocab_size=vocab, hidden_size=hidden,
                     num_hidden_layers=len(layers), num_attention_heads=heads, num_key_value_heads=k_out // head_dim,
                     head_dim=head_dim, tie_word_embeddings=is_tied(sd), use_moe=use_moe)
    if use_moe:
        experts = {int(m.group(1)) for k in sd if k.startswith(mlp) and (m := _EXPERT.search(k))}
        shared = {k.split(".")[5] for k in sd if k.startswith(mlp + "shared_experts.")}
        width = sd[mlp + "experts.0.gate_proj.weight"].shape[0]
        cfg.update(num_experts=len(experts), n_shared_experts=len(shared), moe_intermediate_size=width,
                   intermediate_size=width, num_experts_per_tok=2 if shared else 1)
    else:
        cfg["intermediate_size"] = sd[mlp + "gate_proj.weight"].shape[0]
    return MiniMindConfig(**{**cfg, **overrides})


def is_tied(sd: dict[str, torch.Tensor], declared: bool | None = None) -> bool:
    """Whether lm_head is the embedding: always when lm_head is absent, else `declared`, else compare the tensors."""
    head, emb = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
    if head is None:
        return True
    if declared is not None:
        return bool(declared)
    if emb is None:
        return False
    return head.data_ptr() == emb.data_ptr() or (head.shape == emb.shape and torch.equal(head, emb))


def normalize_state_dict(state_dict: dict, config: MiniMindConfig) -> dict:
    """Strip prefixes, drop non-persistent RoPE tables some exports carry, add a tied lm_head if absent."""
    sd = {k: v for k, v in strip_prefixes(state_dict).items()
          if not k.endswith(("freqs_cos", "freqs_sin", "rotary_emb.inv_freq"))}
    if config.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def explain_mismatch(state_dict: dict, model: torch.nn.Module, hint: bool = True) -> str | None:
    """A readable reason why `state_dict` does not fit `model`, or None if it does. `hint` adds what a config-less
    state_dict looks like (only meaningful for native .pth files, whose heads are guessed)."""
    if is_legacy(state_dict):
        return "this state_dict " + LEGACY_MESSAGE
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0][0]}: checkpoint {wrong[0][1]} vs model "
                     f"{wrong[0][2]}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    hint_text = _describe(state_dict) if hint else ""
    return "state_dict does not match the model config: " + "; ".join(parts) + "." + hint_text


def _describe(state_dict: dict) -> str:
    """What the checkpoint itself looks like, as a hint; empty when its architecture cannot be inferred."""
    try:
        found = infer_config(state_dict)
    except CheckpointError:
        return ""
    return (f" The checkpoint looks like {found.era}: hidden {found.hidden_size}, {found.num_hidden_layers} "
            f"layers, {found.num_key_value_heads} kv heads, head_dim {found.head_dim}, FFN "
            f"{found.intermediate_size}{', q/k norm' if found.qk_norm else ''}. Build the model from it with "
            "`MiniMindConfig` fields matching those, or simply use `minimind.load_model(path)`, which infers them.")
