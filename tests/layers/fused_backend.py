"""A test-only layer backend that fuses parameters the way Transformer Engine does.

``norm_linear`` holds one ``layer_norm_weight`` and one ``weight`` stacking this rank's Q, K and V
rows; ``norm_mlp`` holds ``layer_norm_weight``, ``fc1_weight`` = [gate rows; up rows] and
``fc2_weight`` (row-parallel down). Other names and layouts than the local backend's, the same
math: if checkpoints, initialization, sharding and optimizer state are right for this backend,
the seam carries a real fused backend (TE) without touching the model, engine or checkpoint code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_phi4.distributed.sharding import stacked, whole
from megatron_phi4.distributed.tensor_parallel import prepare_tp_input, reduce_from_tp, reduce_scatter_to_sp
from megatron_phi4.layers.local import LocalBackend


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class FusedNormLinear(nn.Module):
    def __init__(self, hidden, outputs, eps, ctx):
        super().__init__()
        self.ctx, self.eps, self.hidden = ctx, eps, hidden
        self.names = tuple(outputs)
        self.global_widths = [outputs[n] for n in self.names]
        self.local_widths = [w // ctx.tp_size for w in self.global_widths]
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden))
        self.weight = nn.Parameter(torch.empty(sum(self.local_widths), hidden))

    def forward(self, x):
        h = prepare_tp_input(_rms(x, self.layer_norm_weight, self.eps), self.ctx.tp_group,
                             self.ctx.sequence_parallel)
        return tuple(F.linear(h, self.weight).split(self.local_widths, dim=-1))

    def param_layout(self):
        pieces = [(n, (g, self.hidden), loc) for n, g, loc in zip(self.names, self.global_widths, self.local_widths)]
        return {"layer_norm_weight": [whole("norm", (self.hidden,), sp_grad=self.ctx.sequence_parallel)],
                "weight": stacked(pieces, tp_offsets=[self.ctx.tp_rank * loc for loc in self.local_widths])}


class FusedNormMLP(nn.Module):
    def __init__(self, hidden, ffn, eps, ctx):
        super().__init__()
        self.ctx, self.eps, self.hidden, self.ffn = ctx, eps, hidden, ffn
        self.local_ffn = ffn // ctx.tp_size
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden))
        self.fc1_weight = nn.Parameter(torch.empty(2 * self.local_ffn, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(hidden, self.local_ffn))

    def forward(self, x):
        h = prepare_tp_input(_rms(x, self.layer_norm_weight, self.eps), self.ctx.tp_group,
                             self.ctx.sequence_parallel)
        gate, up = F.linear(h, self.fc1_weight).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, self.fc2_weight)
        return (reduce_scatter_to_sp(y, self.ctx.tp_group) if self.ctx.sequence_parallel
                else reduce_from_tp(y, self.ctx.tp_group))

    def param_layout(self):
        off = self.ctx.tp_rank * self.local_ffn
        fc1 = [("gate_proj", (self.ffn, self.hidden), self.local_ffn), ("up_proj", (self.ffn, self.hidden), self.local_ffn)]
        return {"layer_norm_weight": [whole("norm", (self.hidden,), sp_grad=self.ctx.sequence_parallel)],
                "fc1_weight": stacked(fc1, tp_offsets=[off, off]),
                "fc2_weight": [whole("down_proj", (self.hidden, self.ffn), tp_dim=1, tp_offset=off)]}


class FusedBackend(LocalBackend):
    name = "fused_test"

    def norm_linear(self, hidden, outputs, eps):
        return FusedNormLinear(hidden, outputs, eps, self.ctx)

    def norm_mlp(self, hidden, ffn, eps):
        return FusedNormMLP(hidden, ffn, eps, self.ctx)


def register() -> None:
    from megatron_phi4.registry import BACKENDS

    if "fused_test" not in BACKENDS:
        BACKENDS.register("fused_test", FusedBackend)
