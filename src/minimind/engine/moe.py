"""The runner's mixture-of-experts feed-forward: the model's routing over the runner's own expert matrices.

Routing is MiniMind's (model/layers.route_experts, the model's own): softmax over the router's logits, the top-k experts, their weights
divided by (sum + 1e-20) when the model renormalises, plus ungated shared experts. The experts are the runner's
linears (fp32, bf16, int8, ...), so the torch path and the fused decode step (kernels/moe.c) read the same
weights; the router stays fp32 on both (4 rows: its logits decide which expert runs, not worth rounding).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..model.layers import route_experts


class MoEWeights:
    def __init__(self, mlp, linear):
        """mlp: the model's MoE module; linear(*projections) -> the runner's linear of those stacked weights."""
        self.top_k, self.renormalize = mlp.top_k, mlp.renormalize
        self.router = mlp.gate.weight.detach().float().contiguous()  # [E, H]
        self.act = mlp.experts[0].act_fn
        # (gate|up [2 I, H], down [H, I]) per routed expert, then per shared expert
        self.experts = [(linear(e.gate_proj, e.up_proj), linear(e.down_proj)) for e in mlp.experts]
        self.shared = [(linear(e.gate_proj, e.up_proj), linear(e.down_proj))
                       for e in getattr(mlp, "shared_experts", ())]

    @property
    def linears(self) -> list:
        return [lin for pair in self.experts + self.shared for lin in pair]

    def _expert(self, pair, x: torch.Tensor) -> torch.Tensor:
        gate, up = pair[0](x).chunk(2, dim=-1)
        return pair[1](self.act(gate) * up)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H]"""
        experts = [partial(self._expert, pair) for pair in self.experts]
        shared = [partial(self._expert, pair) for pair in self.shared]
        return route_experts(x, F.linear(x.float(), self.router), experts, shared, self.top_k, self.renormalize)
