"""ModelSpec: which model to run and how to load it, from MiniMind's eval_llm.py flags or from code. The commands
add the flags with `ModelSpec.add_arguments` and build one with `from_args`: no argparse Namespace goes further."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import CheckpointError
from . import detect as fmt

SEED_HIDDEN_SIZES = (512, 768, 640)  # tried in this order when --hidden_size is not given
NO_LORA = (None, "", "None", "none")
# --inference_rope_scaling: nothing/1 = YaRN x16, 0 = off, 'legacy' = the Oct-Nov 2025 x4 formula
ROPE_SCALING = {"legacy": "legacy", **dict.fromkeys(("1", "true", "yes", "on", "yarn"), True),
                **dict.fromkeys(("0", "false", "no", "off"), False)}


def rope_scaling_arg(value: str):
    if value.strip().lower() not in ROPE_SCALING:
        raise argparse.ArgumentTypeError(f"expected nothing, 1/0 or 'legacy', got {value!r}")
    return ROPE_SCALING[value.strip().lower()]


@dataclass(frozen=True)
class Source:  # where weights and tokenizer come from
    model: Path | None  # None = the embedded default model
    tokenizer: Path | None
    weight: str  # weight name (pretrain*, full_sft, ...): decides pretrain-style prompting


@dataclass
class ModelSpec:
    """The model flags of `minimind chat` (the original eval_llm.py's, plus --model/--tokenizer/--device/--dtype)."""

    load_from: str | None = None
    save_dir: str = "out"
    weight: str | None = None
    lora_weight: str | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None  # read from the weights; a different value only warns
    use_moe: bool = False
    inference_rope_scaling: bool | str = False
    model: str | None = None
    tokenizer: str | None = None
    device: str | None = None
    dtype: str = "auto"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                      title: str = "model (the original eval_llm.py flags)", helps: dict[str, str] | None = None):
        """Add the model flags (all, or the fields named in `only`; `helps` replaces their help texts) as one
        argument group; returns it."""
        g = parser.add_argument_group(title)

        def add(name: str, *args, **kwargs) -> None:
            if only is None or name in only:
                g.add_argument(f"--{name}", *args, **{**kwargs, "help": (helps or {}).get(name, kwargs["help"])})

        add("load_from", default=None, metavar="PATH",
            help="tokenizer folder of the original layout (weights then come from --save_dir/--weight/--hidden_size),"
                 " or a Hugging Face model folder / GGUF file. Default: 'model' if --save_dir has .pth files, else the "
                 "embedded default model")
        add("save_dir", default="out", help="folder of the native .pth weights")
        add("weight", default=None, help="weight name prefix: pretrain, full_sft, dpo, reason, grpo, ... (file "
            "{save_dir}/{weight}_{hidden_size}[_moe].pth; default full_sft). pretrain* weights get bos + text instead "
            "of the chat template")
        add("lora_weight", default=None, help="LoRA name (e.g. lora_identity, looked up in every historic location "
            "under --save_dir) or file; None = no LoRA")
        add("hidden_size", type=int, default=None, help=f"hidden size in the weight file name (default: the first of "
            f"{SEED_HIDDEN_SIZES} found, then any other size in --save_dir)")
        add("num_hidden_layers", type=int, default=None,
            help="accepted for compatibility: the layer count is read from the weights (warns if different)")
        add("use_moe", type=int, choices=(0, 1), default=0, help="MoE weights (adds _moe to the file name)")
        add("inference_rope_scaling", nargs="?", const=True, default=False, type=rope_scaling_arg, metavar="legacy",
            help="YaRN RoPE extrapolation (x16, standard); 'legacy' = the Oct-Nov 2025 x4 formula")
        add("model", default=None, metavar="PATH",
            help="any checkpoint: native .pth, Hugging Face folder (minimind/llama/qwen3) or GGUF")
        add("tokenizer", default=None, metavar="DIR", help="tokenizer folder (overrides --load_from)")
        add("device", default=None, help="cuda, cpu, mps, cuda:1 ... (default: cuda if available, else cpu)")
        add("dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
            help="auto = float32 on CPU, bfloat16 on CUDA (float16 on CPU is replaced by bfloat16)")
        return g

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelSpec:
        spec = cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
        spec.use_moe = bool(spec.use_moe)
        return spec

    @property
    def dtype_or_none(self) -> str | None:
        return None if self.dtype == "auto" else self.dtype

    def resolve(self) -> Source:
        """eval_llm.py's rules minus its `'model' in path` test: a tokenizer-only folder means the native layout
        (`{save_dir}/{weight}_{hidden}[_moe].pth`); a model folder or GGUF is used as is."""
        tokenizer = Path(self.tokenizer) if self.tokenizer else None
        if self.model:
            model = Path(self.model).expanduser()
            if not model.exists():
                raise CheckpointError(model, "does not exist (--model takes a .pth/.safetensors/.gguf file or a "
                                      "model folder)")
            if tokenizer is None:  # a bare .pth has no tokenizer: the original layout's folder if it is there
                fallback = Path(self.load_from or "model")
                bare = model.is_file() and fmt.sniff_file(model) != fmt.GGUF
                tokenizer = fallback if bare and fallback.is_dir() else model
            return Source(model, tokenizer, self.weight or model.stem)
        save_dir = Path(self.save_dir)
        if self.load_from is None and not any(save_dir.glob("*.pth")):
            return Source(None, tokenizer, self.weight or "default")
        load_from = Path(self.load_from or "model").expanduser()
        if self.load_from is not None or tokenizer is None:
            if not load_from.exists():
                raise CheckpointError(load_from, "does not exist: --load_from takes the original layout's tokenizer "
                                      "folder (`model/`), a Hugging Face model folder or a GGUF file (or pass "
                                      "--tokenizer DIR)")
            if load_from.is_file() or (load_from / "config.json").is_file() or fmt.only_gguf(load_from):
                return Source(load_from, tokenizer or load_from, self.weight or load_from.stem)
        weight = self.weight or "full_sft"
        sizes = [self.hidden_size] if self.hidden_size else _seed_sizes(save_dir, weight, self.use_moe)
        tried = [seed_path(save_dir, weight, h, self.use_moe) for h in sizes]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise CheckpointError(tried[0], "not found (from --save_dir/--weight/--hidden_size/--use_moe; tried "
                                  + ", ".join(map(str, tried)) + "); pass --model PATH for any other file")
        return Source(found, tokenizer or load_from, weight)

    def lora_path(self, hidden_size: int | None = None, name: str | None = None) -> Path | None:
        """The LoRA file of `name` (default --lora_weight) for a model of `hidden_size`; None without a LoRA."""
        from .lora import resolve_lora_path

        name = self.lora_weight if name is None else name
        if name in NO_LORA:
            return None
        return resolve_lora_path(name, self.save_dir, hidden_size or self.hidden_size or 512, self.use_moe)

    def load(self, device: str = "cpu", source: Source | None = None):
        """(model, tokenizer) with --lora_weight applied: MiniMindLM on CPU (what the engine runs), elsewhere
        MiniMindForCausalLM (HF generate). The weights are read and checked first: an unusable model file is named
        as such, never reported as a missing tokenizer."""
        from .default_model import weights_path
        from .dtypes import resolve_dtype
        from .loader import build_model, check_tokenizer_matches, load_tokenizer, read_checkpoint
        from .lora import load_lora

        source = source or self.resolve()
        # on CPU a GGUF's quantized matrices stay as stored (the engine computes from them), unless a LoRA
        # must change them or another dtype is asked for
        keep = device == "cpu" and self.dtype_or_none in (None, "float32") and self.lora_weight in NO_LORA
        blocks = {} if keep else None
        path = weights_path(keep) if source.model is None else source.model
        config, sd = read_checkpoint(path, weights_dtype=resolve_dtype(self.dtype_or_none, device), blocks=blocks)
        tokenizer = load_tokenizer(source.tokenizer)
        check_tokenizer_matches(tokenizer, config, where=str(source.tokenizer or "default tokenizer"))
        model = build_model(path, config, sd, inference_rope_scaling=self.inference_rope_scaling, device=device,
                            light=device == "cpu", blocks=blocks)
        del sd
        lora = self.lora_path(model.config.hidden_size)
        if lora is not None:
            load_lora(model, lora)
        return model, tokenizer


def seed_path(save_dir: str | Path, weight: str, hidden_size: int, use_moe: bool) -> Path:
    """The original eval_llm.py naming: `{save_dir}/{weight}_{hidden_size}{_moe}.pth`."""
    return Path(save_dir) / f"{weight}_{hidden_size}{'_moe' if use_moe else ''}.pth"


def _seed_sizes(save_dir: Path, weight: str, use_moe: bool) -> list[int]:
    """Hidden sizes to try: the released ones first, then any other `{weight}_{N}[_moe].pth` in save_dir."""
    pattern = re.compile(rf"{re.escape(weight)}_(\d+){'_moe' if use_moe else ''}\.pth")
    found = sorted({int(m.group(1)) for f in save_dir.glob(f"{weight}_*.pth") if (m := pattern.fullmatch(f.name))})
    return [*SEED_HIDDEN_SIZES, *(h for h in found if h not in SEED_HIDDEN_SIZES)]
