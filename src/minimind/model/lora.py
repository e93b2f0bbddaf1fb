"""MiniMind's own LoRA (not PEFT) as a wrapper module with MiniMind's key layout (files: checkpoint/lora.py).

Every square `nn.Linear` (q_proj and o_proj in all released configs) gets y = W x + B(A x), no alpha or scaling.
Keys: `{module}.lora.A.weight` [r, in] and `{module}.lora.B.weight` [out, r]; r is 8 (MiniMind2/2510) or 16
(minimind-3), so it is always read from the shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class LoRALinear(nn.Linear):
    """An nn.Linear plus a `lora` child, sharing the wrapped Linear's Parameters so the base weight keeps its key.

    After `merge()` the weight holds W + B A, forward stops adding the adapter and `state_dict()` omits the adapter
    keys, so `torch.save(model.state_dict())` after merging writes a plain, loadable model.
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
        delta = self.lora.B.weight.float() @ self.lora.A.weight.float()  # [out, in]
        return (self.weight.detach().float() + delta).to(self.weight.dtype)

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


def square_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """MiniMind's LoRA targets: every Linear with in == out (never anything inside an adapter)."""
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
    targets = square_linears(model)
    if not targets:
        raise ValueError("model has no square nn.Linear to put a LoRA on")
    for name, linear in targets.items():
        _unwrap(model).set_submodule(name, LoRALinear(linear, rank))
    return model


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
    """A plain state_dict (base keys, adapters folded into W) that loads strictly into a model without LoRA; the
    model is not changed."""
    layers = lora_layers(model)
    prefixes = tuple(f"{name}.lora." for name in layers)
    sd = {k: v for k, v in _unwrap(model).state_dict().items() if not k.startswith(prefixes)}
    for name, layer in layers.items():
        sd[f"{name}.weight"] = layer.merged_weight().clone()
    return sd
