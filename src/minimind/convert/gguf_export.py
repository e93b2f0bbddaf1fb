"""`--to gguf`: a GGUF file that a stock llama.cpp loads and chats with (architectures: docs/deploy.md).

llama.cpp's `llama` and `bailingmoe` graphs use interleaved RoPE, so Q/K rows are permuted exactly like its own
converter (`LlamaModel.permute`); `qwen3`/`qwen3moe` use NEOX (rotate_half) RoPE and take the HF rows as they are.
llama.cpp knows pre-tokenizers only by name: MiniMind's ByteLevel(use_regex) is its `gpt-2`, SmolLM2's
Digits+ByteLevel its `smollm`; anything else is refused rather than written with one that tokenizes differently.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from ..config import MiniMindConfig
from .hf_export import merge_shared_experts, renormalizes, standard_rope
from .output import atomic_output, chat_template, progress
from .source import ConvertError, Source, load_source

log = logging.getLogger("minimind")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q4_k_m": "MOSTLY_Q4_K_M"}
OUTTYPES = tuple(_FILE_TYPES)
QUANTS = ("q8_0", "q4_0", "q4_k_m")  # `convert --quant`: the quantized outtypes the engine runs from their blocks


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown GGUF outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")


def gguf_arch(config: MiniMindConfig) -> str:
    """The llama.cpp architecture whose graph computes exactly what this model does."""
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    if config.qk_norm and not config.n_shared_experts:
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
    if arch == "bailingmoe":
        sd = merge_shared_experts(config, sd)
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])  # `output` is required there
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        if ".mlp.experts." in key:  # model.layers.i.mlp.experts.e.proj.weight -> grouped per (layer, proj)
            parts = key.split(".")
            experts.setdefault(".".join(parts[:5] + parts[6:7]), {})[int(parts[5])] = value
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
    for stem, by_index in experts.items():
        stacked = torch.stack([by_index[e] for e in sorted(by_index)])
        yield f"{names.get_name(stem)}.weight", stacked.float().numpy()


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(name: str, cols: int, n_layers: int, tied: bool) -> str:
    """The type llama.cpp's `llama-quantize ... Q4_K_M` gives this tensor (llama-quant.cpp, dense and MoE layers
    without its 8-expert special cases): Q6_K for the output matrix (the token embedding when tied to it, Q8_0 when
    its rows are not whole super-blocks), for attn_v and ffn_down of the layers `use_more_bits` picks (the first and
    last eighth, every third between); Q4_K elsewhere. Rows not a multiple of 256 fall back as llama.cpp's do:
    Q4_K -> Q5_0, Q6_K -> Q8_0 (F16 when not a multiple of 32 either)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "q8_0" if cols % 256 else "q6_k"
    m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)", name)
    kind = "q6_k" if m and _use_more_bits(int(m[1]), n_layers) else "q4_k"
    if cols % 256:
        kind = "f16" if cols % 32 else {"q4_k": "q5_0", "q6_k": "q8_0"}[kind]
    return kind


def _encode(name: str, data: np.ndarray, outtype: str, n_layers: int = 0, tied: bool = False):
    """(array, raw_dtype) in the requested type; 1-D tensors and the MoE router stay F32 (as llama.cpp's
    converter does); rows not divisible by the 32-value block size of q8_0/q4_0/q4_1 fall back to F16, q4_k_m
    mixes types per tensor as llama.cpp does (q4_k_m_type)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if outtype == "f32" or data.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        return data.astype(np.float32), None
    if outtype == "q4_k_m":
        outtype = q4_k_m_type(name, data.shape[-1], n_layers, tied)
        if outtype in ("q4_k", "q6_k"):
            from ..checkpoint.kquants import quantize_k

            qtype = Q.Q4_K if outtype == "q4_k" else Q.Q6_K
            return quantize_k(data, int(qtype)), qtype
    if outtype.startswith("q") and data.shape[-1] % 32:
        log.warning("%s: row size %d is not a multiple of 32, stored as F16", name, data.shape[-1])
        outtype = "f16"
    if outtype == "f16":
        return data.astype(np.float16), None
    qtype = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0}[outtype]
    return quantize(data, qtype), qtype


def detect_pre_tokenizer(spec: dict) -> str:
    """The llama.cpp pre-tokenizer whose regex equals the pre-tokenizer of this tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("use_regex", True), s.get("individual_digits")) for s in steps]
    if len(kinds) == 1 and kinds[0][:2] == ("ByteLevel", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", True, None)] and not steps[1].get("add_prefix_space"):
        return "smollm"
    raise ConvertError(f"pre-tokenizer {pre} has no known llama.cpp equivalent; tokenization would differ")


def _add_tokenizer(w, source: Source, pre: str | None) -> None:
    """tokens, token types and merges, padded with unused tokens up to the model's embedding rows; special ids."""
    from gguf import TokenType

    tok, config = source.tokenizer, source.config
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConvertError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    if len(id_to_tok) > config.vocab_size:
        raise ConvertError(f"tokenizer has {len(id_to_tok)} tokens, the model only {config.vocab_size} embedding rows")

    def token_type(i: int) -> TokenType:
        if i not in id_to_tok:
            return TokenType.UNUSED
        if i not in added:
            return TokenType.NORMAL
        return TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED

    rows = range(config.vocab_size)
    tokens, types = [id_to_tok.get(i, f"[PAD{i}]") for i in rows], [token_type(i) for i in rows]
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConvertError(f"tokenizer model {model.get('type')} is not BPE; only GPT-2 style BPE is exported")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or detect_pre_tokenizer(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    bos = config.bos_token_id if tok.bos_token_id is None else tok.bos_token_id
    eos = config.eos_token_id if tok.eos_token_id is None else tok.eos_token_id
    for add, idx in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_pad_token_id, tok.pad_token_id),
                     (w.add_unk_token_id, tok.unk_token_id)):
        if idx is not None:
            add(int(idx[0] if isinstance(idx, list) else idx))  # a config's eos may be a list
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    w.add_add_eos_token(False)
    template = chat_template(tok)
    if template:
        w.add_chat_template(template)


def _add_hparams(w, config: MiniMindConfig, arch: str, outtype: str) -> None:
    import gguf

    values = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
              "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
              "head_count": config.num_attention_heads, "head_count_kv": config.num_key_value_heads,
              "layer_norm_rms_eps": config.rms_norm_eps, "rope_freq_base": config.rope_theta,
              "rope_dimension_count": config.head_dim, "key_length": config.head_dim,
              "value_length": config.head_dim, "vocab_size": config.vocab_size,
              "file_type": gguf.LlamaFileType[_FILE_TYPES[outtype]]}
    if arch in ("qwen3moe", "bailingmoe"):
        values.update(expert_count=config.num_experts, expert_used_count=config.num_experts_per_tok,
                      expert_feed_forward_length=config.moe_intermediate_size)
    if arch == "bailingmoe":
        values.update(expert_shared_count=config.n_shared_experts, expert_weights_norm=renormalizes(config),
                      expert_weights_scale=1.0, leading_dense_block_count=0)
    scaling = standard_rope(config)  # drops (with a warning) the legacy formula, which llama.cpp lacks too
    if scaling and scaling["rope_type"] != "yarn":
        raise ConvertError(f"RoPE scaling {scaling['rope_type']!r} is not exported to GGUF")
    if scaling:
        log.warning("YaRN in GGUF: llama.cpp's YaRN implementation was not verified against MiniMind's here")
        values.update(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=float(scaling["factor"]),
                      rope_scaling_orig_ctx_len=int(scaling["original_max_position_embeddings"]),
                      rope_scaling_yarn_beta_fast=float(scaling.get("beta_fast", 32)),
                      rope_scaling_yarn_beta_slow=float(scaling.get("beta_slow", 1)),
                      rope_scaling_yarn_attn_factor=float(scaling.get("attention_factor", 1.0)))
    for key, value in values.items():  # GGUFWriter.add_<key>: each knows its metadata name and value type
        getattr(w, f"add_{key}")(value)


def export_gguf(src, out_path, outtype: str = "f16", *, tokenizer=None, lora=None, force: bool = False,
                pre_tokenizer: str | None = None, show_progress: bool = True) -> Path:
    """GGUF file for llama.cpp; outtype is one of OUTTYPES (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_m)."""
    import gguf

    check_outtype(outtype)  # before the slow load
    source = load_source(src, tokenizer=tokenizer, lora=lora, need_tokenizer=True)
    config = source.config
    arch = gguf_arch(config)
    if config.vocab_size == 6400 and len(source.tokenizer) != 6400:
        log.warning("tokenizer has %d tokens for a 6400-row model", len(source.tokenizer))
    with atomic_output(out_path, force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(source.name)
        _add_hparams(w, config, arch, outtype)
        _add_tokenizer(w, source, pre_tokenizer)
        total = len(source.state_dict) + 1
        with progress(f"Converting to GGUF {arch} {outtype.upper()}", total, show_progress) as advance:
            tied = "lm_head.weight" not in source.state_dict and arch != "bailingmoe"  # bailingmoe writes `output`
            for name, data in _tensors(config, source.state_dict, arch):
                array, raw = _encode(name, data, outtype, config.num_hidden_layers, tied)
                w.add_tensor(name, array, raw_dtype=raw)
                advance()
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            w.close()
            advance()
    return Path(out_path)
