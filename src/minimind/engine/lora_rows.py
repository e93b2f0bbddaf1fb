"""LoRA adapters applied per row, so requests for different adapters (and the base model) share one batch.

The runner's fused weights stay the base model's. For the rows of a step that asked for adapter i, each adapted
projection adds B_i (A_i x) to its output slice (q, k, v inside the fused q|k|v output, gate and up inside
gate|up), as the original LoRALinear computes W x + B A x. Only rows with an adapter pay for it.
"""
from __future__ import annotations

import re

import torch

_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$")
# which fused runner matrix each projection lives in
_FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}


class RowLoRA:
    def __init__(self, config, dtype: torch.dtype):
        d = config.head_dim
        q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
        self.offsets = {"q": 0, "k": q_rows, "v": q_rows + kv_rows, "o": 0, "gate": 0,
                        "up": config.intermediate_size, "down": 0}
        self.dtype = dtype
        # adapters[i][layer][fused matrix] = [(row offset, A [r, in], B [out, r])]
        self.adapters: list[dict[int, dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]]] = []

    def add(self, pairs: dict[str, dict[str, torch.Tensor]]) -> int:
        """pairs from checkpoint.lora.read_adapter -> the adapter's index (what Sequence.lora holds)."""
        layers: dict[int, dict[str, list]] = {}
        for name, p in pairs.items():
            m = _NAME.search(name)
            if m is None:
                raise ValueError(f"the engine cannot apply a LoRA on `{name}` per request; merge it into the "
                                 "weights instead (minimind convert --lora)")
            layer, proj = int(m.group(1)), m.group(2)
            a, b = p["A"].to(self.dtype).contiguous(), p["B"].to(self.dtype).contiguous()
            layers.setdefault(layer, {}).setdefault(_FUSED[proj], []).append((self.offsets[proj], a, b))
        self.adapters.append(layers)
        return len(self.adapters) - 1

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, matrix: str, groups) -> torch.Tensor:
        """y [N, out] = matrix(x [N, in]); adds each group's adapter on its rows. groups: [(adapter, rows [n])]."""
        for index, rows in groups:
            parts = self.adapters[index].get(layer, {}).get(matrix)
            if not parts:
                continue
            xr = x[rows]
            for offset, a, b in parts:
                cols = slice(offset, offset + b.shape[0])
                y[rows, cols] = y[rows, cols] + (xr @ a.T) @ b.T
        return y
