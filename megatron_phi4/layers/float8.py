"""FP8 training for the local backend: torchao's float8 recipes on tensor-parallel linears.

torchao's float8 training (``torchao.float8``) casts the two operands of each of a linear layer's
three matrix products (output, input gradient, weight gradient) to FP8 with a scale computed from
the tensor's current absolute maximum (amax): one scale per tensor ("tensorwise": E4M3 forward, E5M2
gradients) or one per row ("rowwise": E4M3, power-of-two scales), then multiplies with
``torch._scaled_mm``. Its module swap (``convert_to_float8_training``) replaces ``nn.Linear``
modules by its own ``Float8Linear``, which would drop our tensor-parallel collectives and
``param_layout()``; and under tensor parallelism each rank would scale its shard by the shard's own
amax, so a TP run would quantize differently from one process.

So the linear layers here subclass the local backend's Column/RowParallelLinear (same parameters,
same names, same collectives, same layout declarations) and replace only the matmul with
``Float8TPMatmul``: torchao's own cast (``hp_tensor_and_scale_to_float8``), scale
(``amax_to_scale``) and scaled-matmul dispatch, with one change -- an amax is all-reduced (MAX)
over the TP group exactly where the reduction it stands for runs over a sharded dimension. A
column-parallel layer shards its output features, a row-parallel one its input features; the
operand of each cast then decides (``_needs_tp_reduction``):

=======================  ==============  =====================  ==========================
cast                     operand dims    tensorwise: reduce if  rowwise: amax over ...
=======================  ==============  =====================  ==========================
input (forward)          tokens x in     in is sharded (row)    in: reduce if row
weight (forward)         in x out        always (sharded)       in: reduce if row
grad_output (dgrad)      tokens x out    out sharded (column)   out: reduce if column
weight (dgrad)           in x out        always                 out: reduce if column
grad_output (wgrad)      tokens x out    out sharded (column)   tokens: never
input (wgrad)            tokens x in     in sharded (row)       tokens: never
=======================  ==============  =====================  ==========================

With every scale global, each FP8 element equals the one-process run's; what remains is the fp32
accumulation order of the sharded products (tests/layers/test_float8.py measures it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_phi4.config import FP8Config
from megatron_phi4.distributed.tensor_parallel import ColumnParallelLinear, RowParallelLinear

# which feature dimension of the weight a parallel style shards
_SHARDED = {"column": "out", "row": "in"}


def torchao_config(recipe: str):
    """torchao's ``Float8LinearConfig`` for a ``model.fp8.recipe`` of the local backend."""
    from torchao.float8 import Float8LinearConfig

    if recipe not in ("tensorwise", "rowwise"):
        raise ValueError(f"model.fp8.recipe: got {recipe!r}, the local backend allows 'tensorwise', 'rowwise'")
    return Float8LinearConfig.from_recipe_name(recipe)


@dataclass(frozen=True)
class _Cast:
    """One FP8 cast: the operand's dimension labels, the dimension its amax runs over (None: the
    whole tensor) and the torchao cast config (target dtype, granularity)."""

    dims: tuple[str, str]
    axis: int | None
    config: object
    role: object


def _needs_tp_reduction(cast: _Cast, sharded: str | None) -> bool:
    """Whether the amax of this cast must be all-reduced over TP to equal the unsharded tensor's."""
    if sharded is None:
        return False
    if cast.axis is None:  # tensorwise: the whole tensor, sharded if it has the sharded dimension
        return sharded in cast.dims
    return cast.dims[cast.axis] == sharded  # axiswise: only if the reduction runs over the sharded dim


class _Plan:
    """How one linear layer casts its operands: torchao's recipe plus the TP reductions."""

    def __init__(self, recipe: str, parallel: str, group):
        from torchao.float8.config import ScalingGranularity, ScalingType
        from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig, ScaledMMConfig

        cfg = torchao_config(recipe)
        self.recipe, self.cfg, self.group = recipe, cfg, group
        self.sharded = _SHARDED[parallel] if group is not None and dist.get_world_size(group) > 1 else None
        self._dynamic, self._axiswise = ScalingType.DYNAMIC, ScalingGranularity.AXISWISE
        self.mm_config = LinearMMConfig(*(
            ScaledMMConfig(cfg.emulate, g.use_fast_accum, False, cfg.pad_inner_dim)
            for g in (cfg.gemm_config_output, cfg.gemm_config_grad_input, cfg.gemm_config_grad_weight)))

        def cast(dims, axis, config, role):
            return _Cast(dims, axis if config.scaling_granularity is ScalingGranularity.AXISWISE else None,
                         config, role)

        x, w, go = ("tokens", "in"), ("in", "out"), ("tokens", "out")
        self.input = cast(x, -1, cfg.cast_config_input, GemmInputRole.INPUT)
        self.weight = cast(w, 0, cfg.cast_config_weight, GemmInputRole.WEIGHT)
        self.grad_output = cast(go, -1, cfg.cast_config_grad_output, GemmInputRole.GRAD_OUTPUT)
        self.weight_for_grad_input = cast(w, -1, cfg.cast_config_weight_for_grad_input, GemmInputRole.WEIGHT)
        self.grad_output_for_grad_weight = cast(go, 0, cfg.cast_config_grad_output_for_grad_weight,
                                                GemmInputRole.GRAD_OUTPUT)
        self.input_for_grad_weight = cast(x, 0, cfg.cast_config_input_for_grad_weight, GemmInputRole.INPUT)

    @torch.no_grad()
    def amax(self, t: torch.Tensor, cast: _Cast) -> torch.Tensor:
        from torchao.float8.float8_utils import tensor_to_amax

        amax = tensor_to_amax(t, scaling_granularity=cast.config.scaling_granularity, axiswise_dim=cast.axis)
        if _needs_tp_reduction(cast, self.sharded):
            amax = amax.contiguous()
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax

    def cast(self, t: torch.Tensor, cast: _Cast):
        """``t`` (2-D, dims as ``cast.dims``) in FP8 with the recipe's (TP-global) scale; high
        precision if the recipe keeps this operand unscaled."""
        from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8
        from torchao.float8.float8_utils import amax_to_scale

        if cast.config.scaling_type is not self._dynamic:
            return t
        scale = amax_to_scale(self.amax(t, cast), cast.config.target_dtype,
                              round_scales_to_power_of_2=self.cfg.round_scales_to_power_of_2)
        return hp_tensor_and_scale_to_float8(t, scale, cast.config.target_dtype, self.mm_config, cast.role,
                                             cast.axis)


class Float8TPMatmul(torch.autograd.Function):
    """``x @ weight.T`` with the three products in FP8 (``_Plan``); same gradients' structure as
    torchao's ``matmul_with_hp_or_float8_args``, scales TP-global."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, plan: _Plan) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan = plan
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(plan.cast(x2, plan.input), plan.cast(weight.t(), plan.weight))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        go = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = torch.mm(plan.cast(go, plan.grad_output), plan.cast(weight.t(), plan.weight_for_grad_input).t())
        grad_w = torch.mm(plan.cast(go, plan.grad_output_for_grad_weight).t(),
                          plan.cast(x2, plan.input_for_grad_weight))
        return grad_x.reshape(x.shape), grad_w.to(weight.dtype), None


class _Float8Mixin:
    """Swaps the plain product of a TP linear for ``Float8TPMatmul``; parameters and layout unchanged."""

    fp8_plan: _Plan

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return Float8TPMatmul.apply(x, self.weight, self.fp8_plan)


class Float8ColumnParallelLinear(_Float8Mixin, ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron_phi4.distributed.tensor_parallel import copy_to_tp, gather_from_sp

        if self.input_mode == "copy":
            x = copy_to_tp(x, self.group)
        elif self.input_mode == "gather_seq":
            x = gather_from_sp(x, self.group)
        y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias
        if self.gather_output:
            y = gather_from_sp(y, self.group, dim=-1)
        return y


class Float8RowParallelLinear(_Float8Mixin, RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron_phi4.distributed.tensor_parallel import reduce_from_tp, reduce_scatter_to_sp

        y = self._matmul(x)
        y = reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias


_FP8_CLASS = {ColumnParallelLinear: (Float8ColumnParallelLinear, "column"),
              RowParallelLinear: (Float8RowParallelLinear, "row")}


def convert_to_float8(module: nn.Module, fp8: FP8Config) -> nn.Module:
    """Turn every Column/RowParallelLinear inside ``module`` (itself included) into its FP8 subclass,
    in place: the same parameter objects, names and ``param_layout()``, so checkpoints, FSDP and
    initialization do not notice. Returns ``module``."""
    for sub in module.modules():
        target = _FP8_CLASS.get(type(sub))
        if target is None:
            continue
        cls, parallel = target
        sub.__class__ = cls
        sub.fp8_plan = _Plan(fp8.recipe, parallel, sub.group)
    return module
