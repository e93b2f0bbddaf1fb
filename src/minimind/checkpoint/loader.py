"""`load_model` / `load_tokenizer`: one entry point for every checkpoint format of every MiniMind release."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import MiniMindConfig
from ..errors import CheckpointError, reason
from ..model.core import MiniMindLM, build_on_meta
from ..model.keys import REDO, infer_config, mismatch, normalize_state_dict
from . import detect as fmt
from .default_model import default_model_dir, weights_path
from .dtypes import resolve_dtype
from .gguf_reader import gguf_tokenizer, read_gguf
from .hf import read_hf_folder
from .int8 import read_int8_folder
from .lora import load_lora
from .native import read_weights_file

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_checkpoint(path: str | Path, *, weights_dtype: torch.dtype | None = None, blocks: dict | None = None,
                    **config_overrides) -> tuple[MiniMindConfig, dict[str, torch.Tensor]]:
    """(config, state_dict with our parameter names) for any supported file or folder, every tensor's name and
    shape checked against the config: the one way `chat`, `serve`, `web` and `convert` read model files, so any
    unusable file (truncated, corrupt, wrong shapes, malformed config, crafted pickle) is one CheckpointError.

    weights_dtype: floating tensors are cast to it one by one while reading, so a bf16 load never holds a full
    fp32 copy beside the bf16 weights (None keeps each file's own dtype; GGUF dequantizes to fp32).
    blocks: a dict for a GGUF's quantized matrices as stored, of the types the engine's kernels read (see
    read_gguf); other formats leave it empty."""
    path = Path(path).expanduser()
    try:
        config, sd = _read(path, weights_dtype, config_overrides, blocks)
    except CheckpointError:
        raise
    except Exception as exc:  # what a reader did not foresee in a damaged file still names the file
        raise CheckpointError(path, f"could not be read ({reason(exc)}): it is probably truncated or corrupt; "
                              "re-download or re-export it") from None
    if wrong := next(((k, v.dtype) for k, v in sd.items() if not v.is_floating_point()), None):
        raise CheckpointError(path, f"tensor `{wrong[0]}` holds {str(wrong[1]).removeprefix('torch.')} values; "
                              f"model weights are floating point. {REDO}")
    return config, sd


def _read(path: Path, weights_dtype: torch.dtype | None, config_overrides: dict, blocks: dict | None = None):
    kind = fmt.detect(path)
    if kind in (fmt.NATIVE, fmt.SAFETENSORS):
        sd = read_weights_file(path, weights_dtype)
        config = infer_config(sd, path, **config_overrides)
    elif kind == fmt.INT8:
        config, sd = read_int8_folder(path, weights_dtype or torch.float32)
    elif kind == fmt.GGUF:  # each tensor checked against the metadata as it is read
        return read_gguf(path, dtype=weights_dtype, blocks=blocks)
    else:  # checked against config.json by the reader, naming both files
        return read_hf_folder(path, kind, dtype=weights_dtype)
    sd = normalize_state_dict(sd, config)
    problem = mismatch(sd, build_on_meta(MiniMindLM, config).state_dict())  # meta device: no memory
    if problem:  # the architecture comes from layer 0 (or config.json): another tensor disagrees with it
        basis = "config.json describes" if kind == fmt.INT8 else "the first layer's shapes describe"
        raise CheckpointError(path, f"its tensors do not fit the model {basis} ({_summary(config)}): "
                              f"{problem} {REDO}")
    return config, sd


def _summary(config: MiniMindConfig) -> str:
    return (f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads "
            f"({config.num_key_value_heads} kv) of {config.head_dim}, FFN {config.intermediate_size}")


def load_model(path: str | Path | None = None, *, lora: str | Path | None = None,
               inference_rope_scaling: bool | str = False, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", flash_attn: bool = True, light: bool = False,
               keep_blocks: bool = False, **config_overrides):
    """Any MiniMind checkpoint (native .pth, HF folder of any flavour, GGUF; None = the embedded default model)
    ready for inference, its weights cast to `dtype` tensor by tensor while they are read.

    inference_rope_scaling: False (the checkpoint's own RoPE), True (standard YaRN x16) or "legacy" (x4).
    light: a plain-torch `MiniMindLM` (what the engine runs; never imports transformers' modeling stack) instead
    of the HF `MiniMindForCausalLM` (generate, save_pretrained), with the same weights and keys.
    keep_blocks: a GGUF's quantized matrices of the types the engine's kernels read stay as stored, on their
    modules as `gguf_blocks` (the engine computes from them; the module's own weight is a stand-in): light models
    without a LoRA only.
    """
    blocks = {} if keep_blocks and light and lora is None else None
    path = weights_path(blocks is not None) if path is None else path
    checkpoint = read_checkpoint(path, weights_dtype=resolve_dtype(dtype, device), blocks=blocks, **config_overrides)
    return build_model(path, *checkpoint, lora=lora, inference_rope_scaling=inference_rope_scaling, device=device,
                       flash_attn=flash_attn, light=light, blocks=blocks)


def build_model(path: str | Path, config: MiniMindConfig, sd: dict[str, torch.Tensor], *,
                lora: str | Path | None = None, inference_rope_scaling: bool | str = False,
                device: str | torch.device = "cpu", flash_attn: bool = True, light: bool = False,
                blocks: dict | None = None):
    """The model of a checkpoint `read_checkpoint` returned (see load_model for the options; blocks: what
    read_checkpoint put there, attached to their modules as `gguf_blocks`)."""
    if light:
        model_class = MiniMindLM
    else:
        from ..model import MiniMindForCausalLM as model_class  # imports transformers' modeling stack
    if inference_rope_scaling:
        config = MiniMindConfig(**{**config.ctor_kwargs(), "inference_rope_scaling": inference_rope_scaling,
                                   "rope_scaling": None})
    config.flash_attn = flash_attn
    model = build_on_meta(model_class, config)
    model.load_state_dict(normalize_state_dict(sd, config), strict=True, assign=True)  # shapes checked when read
    del sd
    model.tie_embeddings()
    model = model.to(device=device).eval()
    model.name_or_path = str(path)
    for key, kept in (blocks or {}).items():
        model.get_submodule(key.removesuffix(".weight")).gguf_blocks = kept
    if blocks and model.config.tie_word_embeddings and "model.embed_tokens.weight" in blocks:
        model.lm_head.gguf_blocks = blocks["model.embed_tokens.weight"]
    if lora is not None:
        load_lora(model, lora)  # wraps the square Linears first if needed; rank comes from the file
    return model


def load_tokenizer(path: str | Path | None = None):
    """The HF tokenizer of a model folder, tokenizer folder or GGUF file (None -> the default model's)."""
    default = path is None
    path = Path(default_model_dir() if default else path).expanduser()
    if not path.exists():
        raise CheckpointError(path, "does not exist (pass --tokenizer DIR with tokenizer.json / tokenizer_config.json)")
    if path.is_file() and fmt.sniff_file(path) != fmt.GGUF:
        raise CheckpointError(path, "is a weights file without a tokenizer: pass the tokenizer folder with "
                              "--tokenizer (for the original layout that is the repository's `model/` folder)")
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        path = fmt.only_gguf(path) or path
        if path.is_dir():
            raise CheckpointError(path, "has no tokenizer.json / tokenizer_config.json")
    if path.is_file():
        return gguf_tokenizer(path)
    try:
        if default and _names_plain_tokenizer(path):  # what AutoTokenizer picks, without its model registry
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), **_added_tokens(path / "tokenizer.json"))
        from transformers import AutoConfig, AutoTokenizer

        # AutoTokenizer reads config.json: model_type "minimind" must be known (the config alone is enough)
        AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types here; name the folder and the cause
        raise CheckpointError(path, f"tokenizer could not be loaded: {type(exc).__name__}: {exc}") from None


def _names_plain_tokenizer(folder: Path) -> bool:
    """Whether tokenizer_config.json names transformers' plain fast tokenizer (as the default model's folder,
    import_gguf's, does): AutoTokenizer then loads that class, after importing its model registry (~0.3 s)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


def _added_tokens(tokenizer_json: Path) -> dict:
    """{"added_tokens_decoder": {id: token fields}} from tokenizer.json's "added_tokens", which the tokenizers
    library writes ahead of the vocabulary: read from the file's start, where from_pretrained would parse all of it
    (3.5 MB for the default model) in Python to find them. {} when they are not there (from_pretrained reads them)."""
    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            head = f.read(1 << 20)
        tokens, _ = json.JSONDecoder().raw_decode(head, re.search(r'"added_tokens"\s*:\s*\[', head).end() - 1)
        return {"added_tokens_decoder": {int(t.pop("id")): t for t in tokens}}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def check_tokenizer_matches(tokenizer, config: MiniMindConfig, where: str = "tokenizer") -> None:
    """Refuse a tokenizer/weights pair that cannot be right (vocab overflow, MiniMind2 vs minimind-3 mix)."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise CheckpointError(where, f"tokenizer has {size} tokens but the model's vocabulary is {config.vocab_size}: "
                              "they do not belong together")
    if config.vocab_size != 6400:
        return
    v3_tokenizer = tokenizer.convert_tokens_to_ids("<tool_call>") == 21
    v2_tokenizer = size == 6400 and not v3_tokenizer and tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    if config.family == "minimind3" and v2_tokenizer:
        raise CheckpointError(where, "this is a MiniMind2/2510 tokenizer but the weights are minimind-3 (q/k norm): "
                              "6391 of 6400 token ids differ between them. Use the minimind-3 tokenizer.")
    if config.family == "minimind2" and v3_tokenizer:
        raise CheckpointError(where, "this is a minimind-3 tokenizer but the weights are MiniMind2/2510: 6391 of "
                              "6400 token ids differ between them. Use the MiniMind2 tokenizer.")
