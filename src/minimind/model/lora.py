"""MiniMind's own LoRA (not PEFT), as a wrapper module with the original file layout.

Every square `nn.Linear` (q_proj and o_proj in all released configs) gets y = W x + B(A x): no alpha, no
scaling. Files hold only `{module}.lora.A.weight` [r, in] and `{module}.lora.B.weight` [out, r]; the rank is
8 in MiniMind2/2510 files and 16 in minimind-3 files, so it is always read from the shapes.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.errors import CheckpointError
from ..checkpoint.native import lora_candidates, read_torch_file, strip_prefixes

_KEY = re.compile(r"^(.+)\.lora\.([AB])\.weight$")


class LoRAAdapter(nn.Module):
    """The low-rank pair: A = Linear(in, r) ~ N(0, 0.02), B = Linear(r, out) = 0, so a fresh adapter is a no-op."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.rank = rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.A.weight.normal_(mean=0.0, std=0.02)
            self.B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    def delta(self) -> torch.Tensor:
        """B @ A in fp32, [out, in]."""
        return self.B.weight.float() @ self.A.weight.float()


class LoRALinear(nn.Linear):
    """An nn.Linear plus a `lora` child. It shares the wrapped Linear's Parameters, so the base weight keeps its
    key (`...q_proj.weight`) and adapter keys are `...q_proj.lora.A.weight` / `.lora.B.weight` as in the original.

    After `merge()` the weight holds W + B A and forward stops adding the adapter; `state_dict()` then omits the
    adapter keys, so `torch.save(model.state_dict())` after merging writes a plain, loadable model (as the seeds do).
    """

    def __init__(self, base: nn.Linear, rank: int):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # a Parameter or None; registers either way
        self.lora = LoRAAdapter(self.in_features, self.out_features, rank,
                                device=base.weight.device, dtype=base.weight.dtype)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None  # exact copy of W while merged (not in state_dict)
        self.register_state_dict_post_hook(_drop_adapter_when_merged)

    @property
    def rank(self) -> int:
        return self.lora.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out if self.merged else out + self.lora(x)

    def set_rank(self, rank: int) -> None:
        """Replace the adapter by a fresh one of another rank (loading a file decides the rank)."""
        if self.merged:
            raise RuntimeError("cannot change the LoRA of a merged layer: call unmerge_lora(model) first")
        if rank != self.rank:
            w = self.weight
            self.lora = LoRAAdapter(self.in_features, self.out_features, rank, device=w.device, dtype=w.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + B A rounded once to W's dtype (W itself when already merged)."""
        if self.merged:
            return self.weight.detach()
        return (self.weight.detach().float() + self.lora.delta()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            new = self.merged_weight()
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(new)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self._unmerged_weight)  # bit-exact: restore the saved W, never subtract
            self._unmerged_weight = None
            self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, merged={self.merged}"


def _drop_adapter_when_merged(module: LoRALinear, state_dict: dict, prefix: str, local_metadata) -> None:
    if module.merged:
        for key in [k for k in state_dict if k.startswith(prefix + "lora.")]:
            del state_dict[key]


def _unwrap(model: nn.Module) -> nn.Module:
    """The real model under torch.compile (`_orig_mod`) or DDP (`module`)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Name -> LoRALinear for every wrapped layer (empty when LoRA was never applied)."""
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def _square_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The original rule: every Linear with in == out (never anything inside an adapter)."""
    return {n: m for n, m in _unwrap(model).named_modules()
            if type(m) is nn.Linear and m.in_features == m.out_features and ".lora." not in f".{n}."}


def apply_lora(model: nn.Module, rank: int = 8) -> nn.Module:
    """Wrap every square nn.Linear in a LoRALinear (A ~ N(0, 0.02), B = 0). Idempotent for the same rank;
    a different rank than already applied is an error (load_lora, by contrast, adopts the file's rank)."""
    existing = lora_layers(model)
    if existing:
        ranks = {m.rank for m in existing.values()}
        if ranks != {rank}:
            raise ValueError(f"LoRA already applied with rank {sorted(ranks)}, asked for rank {rank}")
        return model
    root = _unwrap(model)
    targets = _square_linears(model)
    if not targets:
        raise ValueError("model has no square nn.Linear to put a LoRA on")
    for name, linear in targets.items():
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name), child, LoRALinear(linear, rank))
    return model


def _read(source, model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(source, dict):
        return "LoRA state_dict", source
    config = getattr(model, "config", None)
    path = resolve_lora_path(source, hidden_size=getattr(config, "hidden_size", 512),
                             use_moe=getattr(config, "use_moe", False))
    return str(path), read_torch_file(path)


def read_adapter(model: nn.Module, path_or_state_dict) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """Read and check an original LoRA file (any era) against `model` without changing it.

    -> (rank, {layer name: {"A": [r, in], "B": [out, r]}}). Safe (weights-only) load; `module.`/`_orig_mod.`
    prefixes stripped. The adapter must cover exactly the model's square Linears with fitting shapes, otherwise a
    CheckpointError names the file and what does not fit.
    """
    where, raw = _read(path_or_state_dict, model)
    sd = strip_prefixes(raw)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in sd.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            other.append(key)
    if not pairs:
        kind = " (it looks like a full model checkpoint)" if "model.embed_tokens.weight" in sd else ""
        raise CheckpointError(where, f"contains no LoRA tensors (`*.lora.A.weight` / `*.lora.B.weight`){kind}; "
                              f"first keys: {list(sd)[:4]}")
    if other:
        raise CheckpointError(where, f"mixes {len(other)} non-LoRA tensors (e.g. {other[:3]}) with the adapter; "
                              "a LoRA file holds only `.lora.A/B.weight` tensors")
    half = sorted(n for n, p in pairs.items() if len(p) != 2)
    if half:
        raise CheckpointError(where, f"has only one of A/B for {len(half)} layer(s), e.g. {half[0]}")
    ranks = {p["A"].shape[0] for p in pairs.values() if p["A"].dim() == 2}
    if len(ranks) != 1 or any(p["A"].dim() != 2 or p["B"].dim() != 2 for p in pairs.values()):
        raise CheckpointError(where, f"inconsistent adapter shapes (ranks found: {sorted(ranks)})")
    rank = ranks.pop()
    targets = lora_layers(model) or _square_linears(model)
    config = getattr(model, "config", None)
    model_hidden = getattr(config, "hidden_size", None) or next(iter(targets.values())).in_features
    for name, p in sorted(pairs.items()):
        layer = targets.get(name)
        if layer is None:
            continue  # reported below together with the other layer mismatches
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        if tuple(p["A"].shape) != want_a or tuple(p["B"].shape) != want_b:
            file_hidden = p["A"].shape[1]
            raise CheckpointError(where, f"rank {rank} adapter for hidden {file_hidden}, model hidden is "
                                  f"{model_hidden} ({name}: A {tuple(p['A'].shape)}, B {tuple(p['B'].shape)}; "
                                  f"expected A {want_a}, B {want_b})")
    extra, missing = sorted(set(pairs) - set(targets)), sorted(set(targets) - set(pairs))
    if extra or missing:
        parts = [f"{len(extra)} adapter(s) for layers the model does not have (e.g. {extra[:2]})"] if extra else []
        if missing:
            parts.append(f"no adapter for {len(missing)} of the model's {len(targets)} LoRA layers "
                         f"(e.g. {missing[:2]}); a partial adapter would silently give wrong output")
        raise CheckpointError(where, f"rank {rank} adapter does not fit this model: " + "; ".join(parts))
    return rank, pairs


def load_lora(model: nn.Module, path_or_state_dict) -> nn.Module:
    """Load an original LoRA file (any era) into `model` (checked by read_adapter), applying LoRA first if needed;
    tensors are cast to each layer's dtype/device. Nothing in the model changes when the file does not fit."""
    rank, pairs = read_adapter(model, path_or_state_dict)
    wrapped = lora_layers(model)
    if any(m.merged for m in wrapped.values()):
        raise RuntimeError("the model's LoRA is merged: call unmerge_lora(model) before loading another adapter")
    if not wrapped:
        apply_lora(model, rank)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.set_rank(rank)
            w = layer.weight
            layer.lora.A.weight.copy_(pairs[name]["A"].to(device=w.device, dtype=w.dtype))
            layer.lora.B.weight.copy_(pairs[name]["B"].to(device=w.device, dtype=w.dtype))
    return model


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write only the adapters, as minimind-3 does: `{name}.lora.A.weight`, `{name}.lora.B.weight`, fp16, CPU."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save (call apply_lora or load_lora first)")
    sd = {f"{name}.lora.{ab}.weight": getattr(layer.lora, ab).weight.detach().cpu().half()
          for name, layer in layers.items() for ab in ("A", "B")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def merge_lora(model: nn.Module) -> nn.Module:
    """W += B @ A in place (fp32 math, one rounding to W's dtype) for every adapter; forward stops adding it."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora, restoring every base weight bit-exactly."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state_dict (base keys only, adapters folded into W) that loads strictly into a model without LoRA.
    The model itself is not changed."""
    layers = lora_layers(model)
    prefixes = tuple(f"{name}.lora." for name in layers)
    sd = {k: v for k, v in _unwrap(model).state_dict().items() if not k.startswith(prefixes)}
    for name, layer in layers.items():
        sd[f"{name}.weight"] = layer.merged_weight().clone()
    return sd


def resolve_lora_path(name_or_path: str | Path, save_dir: str | Path = "out", hidden_size: int = 512,
                      use_moe: bool = False) -> Path:
    """An existing file as given, else the first existing historic location of LoRA `name`
    (`out/lora/{name}_{h}.pth`, `out/{name}_{h}{_moe}.pth`, ...). Raises CheckpointError listing every path tried."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    tried = [given]
    if given.suffix not in (".pth", ".pt", ".bin") and len(given.parts) == 1:  # a bare name like lora_identity
        name, base = str(name_or_path), Path(save_dir)
        for cand in [*lora_candidates(str(save_dir), name, hidden_size, use_moe),
                     base / "lora" / f"{name}.pth", base / f"{name}.pth"]:
            if cand not in tried:
                tried.append(cand)
            if cand.is_file():
                return cand
    raise CheckpointError(name_or_path, "LoRA file not found; tried: " + ", ".join(str(p) for p in tried))
