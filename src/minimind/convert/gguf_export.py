"""`--to gguf`: a GGUF file that a stock, unpatched llama.cpp loads and chats with (written with the `gguf` package).

Architectures: `llama` for MiniMind2/2510 dense and Llama-shaped models (the default SmolLM2), `qwen3` for
minimind-3 dense, `qwen3moe` for minimind-3 MoE, and `bailingmoe` (Ling) for MiniMind2 MoE: its graph is exactly
MiniMind2's MoE block (softmax router, top-k, optional renormalisation, plus *ungated* shared experts of the expert
width) on plain Llama attention. It needs an `output` tensor, so a tied lm_head is written as a copy.

llama.cpp's `llama` and `bailingmoe` graphs use interleaved RoPE, so Q/K rows are permuted exactly like its own
converter (`LlamaModel.permute`); `qwen3`/`qwen3moe` use NEOX (rotate_half) RoPE and take the HF rows as they are.

The tokenizer is written as a GPT-2 style BPE (`tokenizer.ggml.model = gpt2`): tokens, token types, merges,
special ids, `add_bos_token = false` and the chat template. llama.cpp recognises the pre-tokenizer by name;
MiniMind's ByteLevel(use_regex) pre-tokenizer is exactly llama.cpp's `gpt-2` regex, SmolLM2's Digits+ByteLevel
is `smollm`. Anything else is refused rather than written with a pre-tokenizer that would tokenize differently.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..config import MiniMindConfig
from .source import ConvertError, Source, atomic_file, progress

log = logging.getLogger("minimind")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_arch(config: MiniMindConfig) -> str:
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.qk_norm and not config.n_shared_experts:
        from .hf_export import renormalizes

        if not renormalizes(config) and config.num_experts_per_tok > 1:
            raise ConvertError("llama.cpp's qwen3moe always renormalises the top-k expert weights; this model "
                               "(norm_topk_prob=false, top_k>1) does not: no exact GGUF is possible")
        return "qwen3moe"
    if not config.qk_norm and config.n_shared_experts and config.intermediate_size == config.moe_intermediate_size:
        return "bailingmoe"
    raise ConvertError(f"{config.era} MoE with q/k norm={config.qk_norm}, {config.n_shared_experts} shared expert(s) "
                       f"of width {config.intermediate_size} (experts {config.moe_intermediate_size}) matches no "
                       "llama.cpp architecture. Export it with --to hf or run it with `minimind serve`.")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rows [2, D/2] -> [D/2, 2] (rotate_half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(config: MiniMindConfig, sd: dict[str, torch.Tensor], arch: str):
    """Yield (gguf name, fp32 numpy array in HF [out, in] order); experts stacked [E, out, in]."""
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    experts: dict[str, dict[int, torch.Tensor]] = {}
    shared: dict[str, dict[int, torch.Tensor]] = {}
    if arch == "bailingmoe" and "lm_head.weight" not in sd:  # `output` is required there
        sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    for key, value in sd.items():
        parts = key.split(".")
        if ".mlp.experts." in key or ".mlp.shared_experts." in key:
            # model.layers.i.mlp.{experts,shared_experts}.e.proj.weight -> grouped per (layer, kind, proj)
            group = experts if ".mlp.experts." in key else shared
            group.setdefault(".".join(parts[:5] + parts[6:7]), {})[int(parts[5])] = value
            continue
        stem, suffix = key.rsplit(".", 1)
        gname = names.get_name(stem)
        if gname is None:
            raise ConvertError(f"no GGUF name for tensor `{key}` in architecture {arch}")
        data = value.float().numpy()
        if arch in ("llama", "bailingmoe") and stem.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
            data = permute_qk(data, heads)
        yield f"{gname}.{suffix}", data
    for stem, per_expert in experts.items():
        stacked = torch.stack([per_expert[e] for e in range(len(per_expert))]).float().numpy()
        yield f"{names.get_name(stem)}.weight", stacked
    for stem, per_expert in shared.items():
        # several shared experts = one wider SwiGLU: gate/up rows and down columns concatenated
        dim = 1 if stem.endswith("down_proj") else 0
        wide = torch.cat([per_expert[e] for e in range(len(per_expert))], dim=dim).float().numpy()
        yield f"{names.get_name(stem)}.weight", wide


def _encode(name: str, data: np.ndarray, outtype: str):
    """(array, raw_dtype) in the requested type; 1-D tensors and the MoE router stay F32 (as llama.cpp's
    converter does); rows not divisible by the Q8_0 block size fall back to F16."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if outtype == "f32" or data.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32:
        log.warning("%s: row size %d is not a multiple of 32, stored as F16", name, data.shape[-1])
        outtype = "f16"
    if outtype == "f16":
        return data.astype(np.float16), None
    qtype = Q.BF16 if outtype == "bf16" else Q.Q8_0
    return quantize(data, qtype), qtype


def detect_pre_tokenizer(tokenizer) -> str:
    """llama.cpp pre-tokenizer name whose regex equals the HF tokenizer's pre-tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ConvertError("GGUF export needs a fast (tokenizer.json) tokenizer")
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("use_regex", True), s.get("individual_digits")) for s in steps]
    if len(kinds) == 1 and kinds[0][:2] == ("ByteLevel", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", True, None)] and not steps[1].get("add_prefix_space"):
        return "smollm"
    raise ConvertError(f"pre-tokenizer {pre} has no known llama.cpp equivalent; tokenization would differ")


def _vocab(tokenizer, vocab_size: int):
    """(tokens, token types, merges) for `tokenizer.ggml.*`; padded with unused tokens up to the model's rows."""
    from gguf import TokenType

    id_to_tok = {i: t for t, i in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    if len(id_to_tok) > vocab_size:
        raise ConvertError(f"tokenizer has {len(id_to_tok)} tokens, the model only {vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_tok:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(id_to_tok[i])
        tok = added.get(i)
        types.append(TokenType.NORMAL if tok is None else (TokenType.CONTROL if tok.special else TokenType.USER_DEFINED))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise ConvertError(f"tokenizer model {model.get('type')} is not BPE; only GPT-2 style BPE is exported")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _add_tokenizer(w, source: Source, pre: str | None) -> None:
    tok, config = source.tokenizer, source.config
    tokens, types, merges = _vocab(tok, config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or detect_pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    ids["bos"] = config.bos_token_id if ids["bos"] is None else ids["bos"]
    ids["eos"] = config.eos_token_id if ids["eos"] is None else ids["eos"]
    for kind, idx in ids.items():
        if isinstance(idx, list):
            idx = idx[0]
        if idx is not None:
            getattr(w, {"unk": "add_unk_token_id"}.get(kind, f"add_{kind}_token_id"))(int(idx))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    w.add_add_eos_token(False)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    if template:
        w.add_chat_template(template)


def _add_hparams(w, config: MiniMindConfig, arch: str, outtype: str) -> None:
    import gguf

    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.head_dim)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(file_type)
    if arch in ("qwen3moe", "bailingmoe"):
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "bailingmoe":
        from .hf_export import renormalizes

        w.add_expert_shared_count(config.n_shared_experts)
        w.add_expert_weights_norm(renormalizes(config))
        w.add_expert_weights_scale(1.0)
        w.add_leading_dense_block_count(0)
    scaling = config.rope_scaling
    if scaling:
        from .hf_export import standard_rope

        hf = standard_rope(config)  # drops (with a warning) the legacy formula, which llama.cpp lacks too
        if hf and hf["rope_type"] != "yarn":
            raise ConvertError(f"RoPE scaling {hf['rope_type']!r} is not exported to GGUF")
        if hf:
            log.warning("YaRN in GGUF: llama.cpp's YaRN implementation was not verified against MiniMind's here")
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(hf["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(hf["original_max_position_embeddings"]))
            w.add_rope_scaling_yarn_beta_fast(float(hf.get("beta_fast", 32)))
            w.add_rope_scaling_yarn_beta_slow(float(hf.get("beta_slow", 1)))
            w.add_rope_scaling_yarn_attn_factor(float(hf.get("attention_factor", 1.0)))


def export_gguf(source: Source, dst: Path, *, outtype: str = "f16", force: bool = False,
                pre_tokenizer: str | None = None, show_progress: bool = True) -> Path:
    import gguf

    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown GGUF outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    if source.tokenizer is None:
        raise ConvertError("a GGUF needs the tokenizer inside it: pass --tokenizer DIR (tokenizer.json folder)")
    config = source.config
    arch = gguf_arch(config)
    if config.vocab_size == 6400 and len(source.tokenizer) != 6400:
        log.warning("tokenizer has %d tokens for a 6400-row model", len(source.tokenizer))
    with atomic_file(Path(dst), force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(source.name)
        _add_hparams(w, config, arch, outtype)
        _add_tokenizer(w, source, pre_tokenizer)
        count = len(source.state_dict)
        with progress(f"Converting to GGUF {arch} {outtype.upper()}", count + 1, show_progress) as advance:
            for name, data in _tensors(config, source.state_dict, arch):
                array, raw = _encode(name, data, outtype)
                w.add_tensor(name, array, raw_dtype=raw)
                advance()
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            w.close()
            advance()
    return Path(dst)
