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


REDO = "The file is damaged or is not a MiniMind checkpoint: re-download or re-export it."


def _shape(sd: dict[str, torch.Tensor], key: str, source: Path | str, ndim: int) -> tuple[int, ...]:
    """The shape of a tensor the architecture is read from: present, `ndim`-D, no empty dimension."""
    if key not in sd:
        raise CheckpointError(source, f"has no tensor `{key}`. {REDO}")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(source, f"tensor `{key}` has shape {shape}, expected a non-empty {ndim}-D tensor. "
                              + REDO)
    return shape


def infer_config(state_dict: dict[str, torch.Tensor], source: Path | str = "state_dict", **overrides) -> MiniMindConfig:
    """Derive the architecture from key names and shapes (see minimind-compat.md, 'Native .pth'). Layer 0's shapes
    must agree with each other and with the embedding; a shape that does not is named (never a division by zero)."""
    sd = strip_prefixes(state_dict)
    if is_legacy(sd):
        raise CheckpointError(source, LEGACY_MESSAGE)
    if "model.embed_tokens.weight" not in sd:
        raise CheckpointError(source, "has no `model.embed_tokens.weight`: not a MiniMind/Llama/Qwen3 state_dict "
                              f"(first keys: {list(sd)[:5]})")
    vocab, hidden = _shape(sd, "model.embed_tokens.weight", source, 2)
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers:
        raise CheckpointError(source, "has no `model.layers.N.*` tensors")
    if layers != list(range(len(layers))):
        raise CheckpointError(source, f"layer indices are not contiguous: {layers}. {REDO}")
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    use_moe = any(".mlp.experts." in k for k in sd)

    def bad(key: str, expected: str):
        return CheckpointError(source, f"tensor `{key}` has shape {tuple(sd[key].shape)}, expected {expected}. {REDO}")

    q_out, q_in = _shape(sd, attn + "q_proj.weight", source, 2)
    k_out, k_in = _shape(sd, attn + "k_proj.weight", source, 2)
    _shape(sd, attn + "o_proj.weight", source, 2)
    for key, n_in in ((attn + "q_proj.weight", q_in), (attn + "k_proj.weight", k_in)):
        if n_in != hidden:
            raise bad(key, f"(rows, {hidden}): the embedding `model.embed_tokens.weight` {(vocab, hidden)} gives "
                      f"hidden size {hidden}")
    v3 = attn + "q_norm.weight" in sd
    if v3:
        (head_dim,) = _shape(sd, attn + "q_norm.weight", source, 1)
        if q_out % head_dim:
            raise bad(attn + "q_proj.weight", f"rows a multiple of head_dim {head_dim} (the length of q_norm)")
        heads = q_out // head_dim
    else:  # MiniMind2/2510 always have 8 query heads and head_dim = hidden / heads
        heads = overrides.pop("num_attention_heads", 8)
        if not isinstance(heads, int) or heads < 1:
            raise CheckpointError(source, f"num_attention_heads must be a positive integer, got {heads!r}")
        if q_out % heads or (q_out // heads) % 2:
            raise bad(attn + "q_proj.weight", f"rows a multiple of {2 * heads} ({heads} query heads of an even "
                      "head_dim)")
        head_dim = q_out // heads
    kv_heads = k_out // head_dim
    if k_out % head_dim or heads % kv_heads:
        raise bad(attn + "k_proj.weight", f"rows = key/value heads x head_dim {head_dim}, the key/value heads "
                  f"dividing the {heads} query heads (e.g. {head_dim * max(heads // 4, 1)})")
    cfg: dict = dict(family="minimind3" if v3 else "minimind2", vocab_size=vocab, hidden_size=hidden,
                     num_hidden_layers=len(layers), num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, tie_word_embeddings=is_tied(sd), use_moe=use_moe)
    if use_moe:
        experts = sorted({int(m.group(1)) for k in sd if k.startswith(mlp) and (m := _EXPERT.search(k))})
        if experts != list(range(len(experts))):
            raise CheckpointError(source, f"layer 0's expert indices are not contiguous: {experts}. {REDO}")
        shared = {k.split(".")[5] for k in sd if k.startswith(mlp + "shared_experts.")}
        width = _shape(sd, mlp + "experts.0.gate_proj.weight", source, 2)[0]
        cfg.update(num_experts=len(experts), n_shared_experts=len(shared), moe_intermediate_size=width,
                   intermediate_size=width, num_experts_per_tok=2 if shared else 1)
    else:
        cfg["intermediate_size"] = _shape(sd, mlp + "gate_proj.weight", source, 2)[0]
    try:
        return MiniMindConfig(**{**cfg, **overrides})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(source, f"its shapes describe no valid model ({exc}). {REDO}") from None


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
    problem = mismatch(state_dict, model.state_dict())
    if problem is None:
        return None
    return "state_dict does not match the model config: " + problem + (_describe(state_dict) if hint else "")


def mismatch(state_dict: dict, expected: dict) -> str | None:
    """Which names and shapes of `state_dict` differ from `expected` (a model's state_dict), or None."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es), e.g. `{wrong[0][0]}` has shape {wrong[0][1]} in the file, "
                     f"the model needs {wrong[0][2]}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    return "; ".join(parts) + "."


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
