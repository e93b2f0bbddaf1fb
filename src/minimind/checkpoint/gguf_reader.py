"""GGUF files (llama.cpp) of the `llama`, `qwen3` and `qwen3moe` architectures -> (MiniMindConfig, state_dict).

Tensors are dequantized to fp32 by `gguf.quants.dequantize` (F32/F16/BF16, Q8_0, Q4/Q5 and the K-quants) and
named through gguf's `get_tensor_name_map`. llama.cpp permutes the Q/K rows of `llama` files for its interleaved
RoPE; that is undone here (`qwen3` files are not permuted). transformers builds the tokenizer from the metadata.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..config import MiniMindConfig
from ..errors import CheckpointError, reason
from ..model.core import MiniMindLM, build_on_meta
from .detect import corrupt
from .gguf_index import GGUFIndex
from .hf import hf_yarn, llama_or_qwen3_config
from .safetensors_file import stacked_groups

log = logging.getLogger("minimind")
SUPPORTED_ARCHS = ("llama", "qwen3", "qwen3moe")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


def _open(path: Path) -> GGUFIndex:
    try:
        return GGUFIndex(path)
    except Exception as exc:  # numpy/struct errors on a truncated or non-GGUF file
        raise corrupt(path, "GGUF", reason(exc)) from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, float):
        value = float(str(np.float32(value)))  # GGUF stores f32: 1e-05, not 9.999999747378752e-06
    if isinstance(value, list) and value and len(set(value)) == 1 and not key.startswith("tokenizer."):
        value = value[0]  # per-layer arrays with one value (some converters write head_count per layer)
    return value


def gguf_config(reader, path: Path) -> MiniMindConfig:
    """MiniMindConfig from the `{arch}.*` metadata; vocab from the embedding rows, tied if no `output.weight`."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(path, f"GGUF architecture {arch!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ARCHS)})")

    def need(key: str, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(path, f"GGUF metadata `{arch}.{key}` is missing")
        if isinstance(value, list):
            raise CheckpointError(path, f"GGUF metadata `{arch}.{key}` varies per layer ({value}): not supported")
        return value

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(path, "has no `token_embd.weight` tensor")
    if "rope_freqs.weight" in names:
        raise CheckpointError(path, "uses per-dimension RoPE frequency factors (`rope_freqs`, Llama-3.1 style "
                              "scaling), which this tool cannot read from GGUF; load the original HF folder instead")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length") or hidden // heads)
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise CheckpointError(path, f"partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
                              f"{head_dim}) are not supported")
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    max_pos = int(_field(reader, f"{arch}.context_length", 2048))
    ffn = need("feed_forward_length", _field(reader, f"{arch}.expert_feed_forward_length"))  # MoE files may omit it
    cfg = dict(
        vocab_size=int(names["token_embd.weight"].shape[-1]),  # ggml order: ne = [hidden, vocab]
        hidden_size=hidden, num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(need("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(ffn), max_position_embeddings=max_pos,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, max_pos, head_dim, theta, path),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))
    if arch == "qwen3moe":  # llama.cpp's qwen3moe always renormalises the top-k weights
        cfg.update(use_moe=True, num_experts=int(need("expert_count")), norm_topk_prob=True,
                   num_experts_per_tok=int(need("expert_used_count")),
                   moe_intermediate_size=int(need("expert_feed_forward_length")))
    return llama_or_qwen3_config(path, qwen3=arch.startswith("qwen3"), **cfg)


def _rope_scaling(reader, arch: str, max_pos: int, head_dim: int, theta: float, path: Path) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind == "none" or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        key = f"{arch}.rope.scaling."
        params = {"factor": float(factor),
                  "original_max_position_embeddings": _field(reader, key + "original_context_length"),
                  "beta_fast": _field(reader, key + "yarn_beta_fast"),
                  "beta_slow": _field(reader, key + "yarn_beta_slow"),
                  # llama.cpp (llama-context.cpp since PR #17945) scales cos/sin by HF's default 0.1*ln(s)+1
                  # times `rope.scaling.attn_factor`; `yarn_attn_factor` is overwritten there when YaRN is on.
                  "attention_factor": float(_field(reader, key + "attn_factor", 1.0))
                  * (1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0)}
        return hf_yarn(params, max_pos, head_dim, theta, path)
    raise CheckpointError(path, f"RoPE scaling type {kind!r} in GGUF metadata is not supported")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute`, which maps each head's [2, D/2] row halves to [D/2, 2]
    (interleaved pairs). w: [n_head * D, H] -> the HF (rotate_half) row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# block types the engine's kernels read as the file stores them (engine/quant.py BlockLinear); values per block
KEPT_BLOCK_TYPES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q4_K": 256, "Q6_K": 256}
_FLOAT_TYPES = ("F32", "F16", "BF16")


def read_gguf(path: str | Path, progress: Callable[[int, int], None] | None = None, dtype: torch.dtype | None = None,
              blocks: dict | None = None) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """(config, state_dict with our/HF parameter names), fp32 or cast to `dtype` tensor by tensor as dequantized.
    `progress(done, total)` is called per tensor. blocks: a dict that receives the Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K
    matrices as stored, {key: (ggml type id, uint8 [rows, bytes])}; their state_dict entries are then one-element stand-ins
    of the right shape (expanded views: no memory) for a model that computes from the blocks."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    reader = _open(path)
    try:
        config = gguf_config(reader, path)
    except CheckpointError:
        raise
    except Exception as exc:  # a metadata value of the wrong type, zero heads, ...
        raise CheckpointError(path, f"its GGUF metadata describes no valid model ({reason(exc)}): re-download or "
                              "re-convert it") from None
    arch_name = _field(reader, "general.architecture")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    expected = build_on_meta(MiniMindLM, config).state_dict()  # MiniMindForCausalLM's keys, no HF modeling
    ours: dict[str, list] = {}  # GGUF name -> [(expert index or None, our name, shape)]
    for key, value in expected.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name, index = key, None
        if m := _EXPERT.match(key):  # qwen3moe stacks experts: blk.i.ffn_{gate,up,down}_exps [E, out, in]
            name, index = f"{m[1]}.{m[3]}.weight", int(m[2])
        ours.setdefault(name_map.get_name(name, try_suffixes=(".weight",)), []).append((index, key, tuple(value.shape)))

    sd: dict[str, torch.Tensor] = {}
    stacked = _stacked_blocks(reader, ours) if blocks is not None else {}
    total, dequantized = len(reader.tensors), set()
    for i, tensor in enumerate(reader.tensors):
        if tensor.name not in ours:
            raise CheckpointError(path, f"unexpected tensor `{tensor.name}` for a {config.num_hidden_layers}-layer "
                                  f"{arch_name} model")
        targets = ours[tensor.name]
        shape = targets[0][2] if targets[0][0] is None else (len(targets), *targets[0][2])
        if blocks is not None and tensor.tensor_type.name in KEPT_BLOCK_TYPES:
            if targets[0][0] is None:
                _keep_blocks(tensor, targets[0][1], shape, arch_name, config, path, blocks, sd,
                             stacked.get(targets[0][1]))
            else:
                _keep_expert_blocks(tensor, targets, shape, path, blocks, sd)
            reader.release(tensor)
            if progress is not None:
                progress(i + 1, total)
            continue
        if blocks is not None and tensor.tensor_type.name not in _FLOAT_TYPES:
            dequantized.add(tensor.tensor_type.name)
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(path, f"tensor `{tensor.name}`: {exc}; re-quantize to Q8_0/Q4_K or F16") from None
        values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # ggml ne is innermost-first
        if values.shape != shape:
            raise CheckpointError(path, f"tensor `{tensor.name}` has shape {values.shape}, the metadata implies "
                                  f"{shape} for `{targets[0][1]}`")
        if arch_name == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):  # qwen3: unpermuted
            heads = config.num_attention_heads if "attn_q" in tensor.name else config.num_key_value_heads
            values = unpermute_qk(values, heads)
        values = torch.from_numpy(np.array(values, dtype=np.float32, order="C"))  # a copy: the file is mmapped
        for index, key, _ in targets:
            one = values if index is None else values[index].clone()  # an expert owns its storage, not a view
            sd[key] = one if dtype is None else one.to(dtype)  # cast now: no fp32 copy of the whole model
        reader.release(tensor)
        if progress is not None:
            progress(i + 1, total)
    if dequantized:
        log.warning("%s: %s tensors are dequantized to fp32 at load (kept in their blocks: %s)", path.name,
                    "/".join(sorted(dequantized)), "/".join(KEPT_BLOCK_TYPES))
    missing = [key for targets in ours.values() for _, key, _ in targets if key not in sd]
    if missing:
        raise CheckpointError(path, f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    return config, sd


def _stacked_blocks(reader, ours: dict) -> dict[str, torch.Tensor]:
    """{key: uint8 view}: one buffer per layer for the q|k|v and the gate|up blocks of one type, rows back to back,
    so the engine's fused matrices are views of what was read, not a second copy."""
    kept = {ours[t.name][0][1]: (int(t.tensor_type), None, t.data.shape) for t in reader.tensors
            if t.name in ours and ours[t.name][0][0] is None and t.tensor_type.name in KEPT_BLOCK_TYPES
            and t.data.ndim == 2}
    views = {}
    for names in stacked_groups(kept):
        rows = [kept[n][2][0] for n in names]
        views.update(zip(names, torch.empty(sum(rows), kept[names[0]][2][1], dtype=torch.uint8).split(rows)))
    return views


def _keep_blocks(tensor, key: str, shape: tuple, arch_name: str, config, path: Path, blocks: dict, sd: dict,
                 out: torch.Tensor | None) -> None:
    """Copy a tensor's blocks out of the mapped file (into `out`, a slot of a stacked buffer, when given)."""
    raw = np.array(tensor.data, dtype=np.uint8, order="C")  # [rows, bytes per row]: a copy, the file is mmapped
    if raw.shape[0] != shape[0] or len(shape) != 2 or shape[1] % KEPT_BLOCK_TYPES[tensor.tensor_type.name]:
        raise CheckpointError(path, f"tensor `{tensor.name}` has {raw.shape[0]} rows of blocks, the metadata implies "
                              f"{shape} for `{key}`")
    if arch_name == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):  # whole rows move
        raw = np.ascontiguousarray(unpermute_qk(raw, config.num_attention_heads if "attn_q" in tensor.name
                                                else config.num_key_value_heads))
    if out is not None and tuple(out.shape) == raw.shape:
        out.numpy()[:] = raw
    else:
        out = torch.from_numpy(raw)
    blocks[key] = (int(tensor.tensor_type), out)
    sd[key] = torch.zeros(1).expand(shape)


def _keep_expert_blocks(tensor, targets: list, shape: tuple, path: Path, blocks: dict, sd: dict) -> None:
    """A qwen3moe stack of experts' blocks [E, rows, bytes per row]: each expert's matrix a view of one copy."""
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, order="C"))
    if raw.dim() != 3 or tuple(raw.shape[:2]) != shape[:2] or shape[2] % KEPT_BLOCK_TYPES[tensor.tensor_type.name]:
        raise CheckpointError(path, f"tensor `{tensor.name}` has {tuple(raw.shape[:2])} experts x rows of blocks, "
                              f"the metadata implies {shape}")
    for index, key, expert_shape in targets:
        blocks[key] = (int(tensor.tensor_type), raw[index])
        sd[key] = torch.zeros(1).expand(expert_shape)


def gguf_tokenizer(path: str | Path):
    """The HF fast tokenizer described by the GGUF metadata, with its chat template and bos/eos tokens."""
    from transformers import AutoTokenizer

    path = Path(path)
    reader = _open(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for unsupported tokenizer metadata
        raise CheckpointError(path, f"could not build the tokenizer from GGUF metadata: "
                              f"{type(exc).__name__}: {exc}") from None
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        # transformers' GGUF conversion drops SmolLM's digit splitting: restore the real pre-tokenizer.
        from tokenizers import pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    template = _field(reader, "tokenizer.chat_template")
    if template and not tok.chat_template:
        tok.chat_template = template
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        idx = _field(reader, f"tokenizer.ggml.{key}")
        if idx is not None and tokens is not None and getattr(tok, attr) is None:
            setattr(tok, attr, tokens.contents(int(idx)))
    return tok
