"""MiniMindConfig: one typed config for every MiniMind release (and Llama/Qwen3-shaped models).

Two families cover all releases:
- "minimind2": MiniMind2 and 2510 (Llama-like; RMSNorm casts before the weight multiply;
  FFN = 64*ceil(int(8h/3)/64); MoE = routed top-2 + shared experts, renormalised only when top_k > 1).
- "minimind3": minimind-3 (per-head q_norm/k_norm; RMSNorm multiplies the weight in fp32;
  FFN = 64*ceil(h*pi/64); MoE = top-1 router, always renormalised).
Individual switches (`qk_norm`, `rms_norm_fp32_weight`) default from the family and can be set
explicitly, which is how a Qwen3 (qk_norm, Llama cast order) checkpoint fits the same code.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

FAMILIES = ("minimind2", "minimind3")

# YaRN dicts written by the original code (see minimind-compat.md, "RoPE and YaRN").
YARN_LEGACY = {"beta_fast": 4, "beta_slow": 1, "factor": 4, "original_max_position_embeddings": 2048,
               "type": "yarn"}
YARN_STANDARD = {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
                 "attention_factor": 1.0, "type": "yarn"}

# Fields the original MiniMindConfig of some era wrote into config.json that we accept but do not need.
_ORIGINAL_IGNORED = {"dropout", "scoring_func", "aux_loss_alpha", "seq_aux", "router_aux_loss_coef",
                     "max_seq_len", "initializer_range", "attention_dropout", "attention_bias", "mlp_bias",
                     "pretraining_tp", "use_sliding_window", "sliding_window", "max_window_layers",
                     "layer_types", "mlp_only_layers", "decoder_sparse_step", "output_router_logits"}
# Keys transformers 4.x/5.x writes into every config.json (generation leftovers and bookkeeping).
_HF_BOOKKEEPING = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "name_or_path", "use_cache", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "chunk_size_feed_forward", "id2label", "label2id", "num_labels", "problem_type", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "prefix",
    "finetuning_task", "pruned_heads", "task_specific_params", "tokenizer_class", "sep_token_id",
    "decoder_start_token_id", "tf_legacy_loss", "use_bfloat16", "_attn_implementation_autoset",
    "attn_implementation", "_commit_hash", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "rope_theta_local", "experts_implementation",
}


def default_intermediate_size(hidden_size: int, family: str) -> int:
    """FFN width the original code derives when `intermediate_size` is None."""
    if family == "minimind3":
        return math.ceil(hidden_size * math.pi / 64) * 64
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


class MiniMindConfig(PretrainedConfig):
    """Architecture of a MiniMind (or Llama/Qwen3-shaped) decoder. Unknown fields raise ValueError."""

    model_type = "minimind"

    def __init__(
        self, *, family: str = "minimind2",
        # shape (None: the family's default)
        vocab_size: int = 6400, hidden_size: int = 512, num_hidden_layers: int = 8, num_attention_heads: int = 8,
        num_key_value_heads: int | None = 2, head_dim: int | None = None, intermediate_size: int | None = None,
        hidden_act: str = "silu", max_position_embeddings: int = 32768, rms_norm_eps: float | None = None,
        # positions, norms, attention
        rope_theta: float = 1e6, rope_scaling: dict | None = None, inference_rope_scaling: bool | str = False,
        tie_word_embeddings: bool = True, qk_norm: bool | None = None, rms_norm_fp32_weight: bool | None = None,
        flash_attn: bool = True,
        # mixture of experts
        use_moe: bool = False, num_experts: int | None = None, num_experts_per_tok: int | None = None,
        n_shared_experts: int | None = None, moe_intermediate_size: int | None = None, norm_topk_prob: bool = True,
        # special tokens
        bos_token_id: int | None = 1, eos_token_id: int | list[int] | None = 2, pad_token_id: int | None = 0,
        **kwargs: Any,
    ):
        routed = kwargs.pop("n_routed_experts", None)  # MiniMind2's name; minimind-3 and Qwen3-MoE write num_experts
        num_experts = routed if num_experts is None else num_experts
        rope_parameters = kwargs.pop("rope_parameters", None)  # transformers 5's name for rope_scaling
        if rope_scaling is None and isinstance(rope_parameters, dict):
            rope_scaling = rope_parameters
        unknown = [k for k in kwargs if k not in _HF_BOOKKEEPING and k not in _ORIGINAL_IGNORED]
        if unknown:
            known = sorted(set(_signature_fields()) | {"n_routed_experts"})
            hints = [f"'{k}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                     for k in unknown]
            raise ValueError(f"MiniMindConfig: unknown field(s) {', '.join(hints)} (the known ones are "
                             "MiniMindConfig's arguments)")
        if kwargs.get("scoring_func", "softmax") != "softmax":
            raise ValueError(f"MiniMindConfig: scoring_func={kwargs['scoring_func']!r} is not supported "
                             "(only 'softmax')")
        for key in _ORIGINAL_IGNORED:
            kwargs.pop(key, None)

        if family not in FAMILIES:
            raise ValueError(f"MiniMindConfig: family must be one of {FAMILIES}, got {family!r}")
        v3 = family == "minimind3"
        self.family = family
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size, family)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps if rms_norm_eps is not None else (1e-6 if v3 else 1e-5)
        self.rope_theta = float(rope_theta)
        self.inference_rope_scaling = inference_rope_scaling
        self.rope_scaling = _resolve_rope_scaling(rope_scaling, inference_rope_scaling)
        self.qk_norm = v3 if qk_norm is None else bool(qk_norm)
        self.rms_norm_fp32_weight = v3 if rms_norm_fp32_weight is None else bool(rms_norm_fp32_weight)
        self.flash_attn = bool(flash_attn)
        self.use_moe = bool(use_moe)
        self.num_experts = num_experts if num_experts is not None else 4
        self.num_experts_per_tok = num_experts_per_tok if num_experts_per_tok is not None else (1 if v3 else 2)
        self.n_shared_experts = n_shared_experts if n_shared_experts is not None else (0 if v3 else 1)
        self.moe_intermediate_size = moe_intermediate_size or self.intermediate_size
        self.norm_topk_prob = bool(norm_topk_prob)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"MiniMindConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                 f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            fail(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
            fail(f"hidden_act {self.hidden_act!r} is not supported")
        if not self.rms_norm_eps > 0:
            fail(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.use_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                fail(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                     f"num_experts ({self.num_experts})")
            if self.n_shared_experts < 0:
                fail(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")

    # transformers 5 turned `rope_scaling` into an alias of `rope_parameters` and rewrites it; MiniMind's
    # dicts (and the legacy formula) must stay as written, so keep our own storage.
    @property
    def rope_scaling(self) -> dict | None:
        return self.__dict__.get("_rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        self.__dict__["_rope_scaling"] = value

    @property
    def era(self) -> str:
        """A human label: 'MiniMind2' / 'minimind-3' (+ ' MoE')."""
        if self.vocab_size != 6400:  # not a MiniMind vocabulary: a Llama/Qwen3-family model such as SmolLM2
            base = "Qwen3-style" if self.qk_norm else "Llama-style"
        else:
            base = "minimind-3" if self.family == "minimind3" else "MiniMind2"
        return base + (" MoE" if self.use_moe else "")

    def to_json_file(self, path: str | Path, use_diff: bool = False) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> MiniMindConfig:
        data = json.loads(Path(path).read_text())
        data.pop("model_type", None)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        internal = ("rope_parameters", "_rope_scaling", "_output_attentions", "_attn_implementation",
                    "_experts_implementation")
        out = {k: v for k, v in super().to_dict().items() if k not in internal}
        out["rope_scaling"] = self.rope_scaling
        return out

    def ctor_kwargs(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this config (to derive a modified copy)."""
        return {n: getattr(self, n) for n in _signature_fields() if hasattr(self, n)}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MiniMindConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _signature_fields() -> list[str]:
    return [p for p in inspect.signature(MiniMindConfig.__init__).parameters if p not in ("self", "kwargs")]


def _resolve_rope_scaling(rope_scaling: dict | None, inference_rope_scaling: bool | str) -> dict | None:
    """The original code overwrites rope_scaling from `inference_rope_scaling`: True = standard YaRN x16,
    "legacy" = MiniMind's factor-4 formula. A 2510 config.json with the factor-4 dict next to
    `inference_rope_scaling: true` means the legacy formula."""
    if inference_rope_scaling == "legacy" or (inference_rope_scaling is True and _is_legacy_yarn(rope_scaling)):
        return {**YARN_LEGACY, "rope_type": "minimind_legacy_yarn"}
    if inference_rope_scaling is True:
        return dict(YARN_STANDARD)
    if inference_rope_scaling not in (False, None):
        raise ValueError(f"inference_rope_scaling must be False, True or 'legacy', got {inference_rope_scaling!r}")
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")  # noqa: TRY004
    scaling = dict(rope_scaling)
    if _is_legacy_yarn(scaling):
        scaling["rope_type"] = "minimind_legacy_yarn"
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("yarn", "minimind_legacy_yarn", "hf_yarn", "linear", "dynamic", "llama3", "longrope"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return scaling


def _is_legacy_yarn(scaling: dict | None) -> bool:
    """MiniMind's factor-4 formula: named so, or the dict the original code wrote for it (YARN_LEGACY)."""
    if not isinstance(scaling, dict):
        return False
    return scaling.get("rope_type") == "minimind_legacy_yarn" or (
        scaling.get("type", scaling.get("rope_type")) == "yarn" and "attention_factor" not in scaling
        and scaling.get("factor") == 4 and scaling.get("beta_fast") == 4)


PRESETS: dict[str, dict[str, Any]] = {
    "minimind2-small": dict(family="minimind2", hidden_size=512, num_hidden_layers=8),
    "minimind2": dict(family="minimind2", hidden_size=768, num_hidden_layers=16),
    "minimind2-moe": dict(family="minimind2", hidden_size=640, num_hidden_layers=8, use_moe=True),
    "minimind-3": dict(family="minimind3", hidden_size=768, num_hidden_layers=8, num_key_value_heads=4),
    "minimind-3-moe": dict(family="minimind3", hidden_size=768, num_hidden_layers=8, num_key_value_heads=4,
                           use_moe=True),
}
