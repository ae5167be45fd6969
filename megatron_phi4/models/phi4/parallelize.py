"""How Phi-4 is parallelized: the tensor-parallel plan as data, and small verbs that apply it.

Order (what the engine does for every model chunk): ``apply_tp`` -> ``apply_sp`` (optional) ->
``apply_ac`` -> ``apply_fsdp`` -> (``apply_compile``, optional). Each verb logs one line.

Attention under TP: query head h reads KV head h // (heads / kv_heads); splitting q_proj
contiguously by query heads and k/v_proj contiguously by KV heads gives every rank whole query
groups (rank r owns query heads [r*H/tp, (r+1)*H/tp) and exactly the KV heads they read), so
attention runs locally with no reordering. SwiGLU: gate/up are separate column-parallel
projections, so rank r holds matching [gate shard; up shard] columns and silu(gate)*up is local;
down is row-parallel.
"""
from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from megatron_phi4.distributed.recompute import apply_recompute
from megatron_phi4.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    prepare_tp_input,
)

logger = logging.getLogger(__name__)

# submodule name pattern -> parallel style.
#   "prepare_input": the module's first input enters the TP region once (copy-to-TP, or the
#       sequence-parallel all-gather) for all the projections that read it.
#   "colwise": column-parallel, input already prepared by the parent.
#   "colwise_own_input": column-parallel that prepares its own input (the LM head); no output
#       gather -- the loss is vocab-parallel.
#   "rowwise": row-parallel (all-reduce, or reduce-scatter to the sequence shard under SP).
#   "vocab_embedding": vocabulary-parallel embedding.
#   "replicated": same full parameter on every TP rank (norms); under SP its gradient is
#       all-reduced over TP because each rank saw only its sequence shard.
TP_PLAN: dict[str, str] = {
    "embed_tokens": "vocab_embedding",
    "layers.*.input_norm": "replicated",
    "layers.*.attention": "prepare_input",
    "layers.*.attention.q_proj": "colwise",
    "layers.*.attention.k_proj": "colwise",
    "layers.*.attention.v_proj": "colwise",
    "layers.*.attention.o_proj": "rowwise",
    "layers.*.post_attention_norm": "replicated",
    "layers.*.mlp": "prepare_input",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "norm": "replicated",
    "lm_head": "colwise_own_input",
}

# Where each style splits its weight: (dimension, None if replicated).
STYLE_SHARD_DIM = {"colwise": 0, "colwise_own_input": 0, "rowwise": 1, "vocab_embedding": 0, "replicated": None}


def tp_style(module_name: str) -> str | None:
    for pattern, style in TP_PLAN.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            return style
    return None


def _prepare_input_hook(module, args):
    return (prepare_tp_input(args[0], module._tp_group, module._tp_sequence_parallel),) + tuple(args[1:])


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_tp(model: nn.Module, tp_group, tp_size: int) -> dict[str, tuple[int | None, int]]:
    """Swap the plan's modules for tensor-parallel ones (works on the meta device).

    Returns {parameter FQN: (shard dim or None, offset along it)} for every parameter of the
    model, the rectangle bookkeeping that loading/saving full tensors needs.
    """
    shard_info: dict[str, tuple[int | None, int]] = {}
    if tp_size == 1:
        return {n: (None, 0) for n, _ in model.named_parameters()}
    for name, module in list(model.named_modules()):
        style = tp_style(name)
        if style is None:
            continue
        if style in ("colwise", "colwise_own_input"):
            w = module.weight
            new = ColumnParallelLinear(module.in_features, module.out_features, tp_group, bias=module.bias is not None,
                                       input_mode="copy" if style == "colwise_own_input" else "none",
                                       device=w.device, dtype=w.dtype)
            _replace(model, name, new)
            shard_info[f"{name}.weight"] = (0, new.shard_offset)
        elif style == "rowwise":
            w = module.weight
            new = RowParallelLinear(module.in_features, module.out_features, tp_group, bias=module.bias is not None,
                                    device=w.device, dtype=w.dtype)
            _replace(model, name, new)
            shard_info[f"{name}.weight"] = (1, new.shard_offset)
        elif style == "vocab_embedding":
            w = module.weight
            new = VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, tp_group,
                                         device=w.device, dtype=w.dtype)
            _replace(model, name, new)
            shard_info[f"{name}.weight"] = (0, new.shard_offset)
        elif style == "prepare_input":
            module._tp_group, module._tp_sequence_parallel = tp_group, False
            module.register_forward_pre_hook(_prepare_input_hook)
            if hasattr(module, "num_heads"):  # attention: local head counts
                for attr in ("num_heads", "num_kv_heads"):
                    total = getattr(module, attr)
                    if total % tp_size:
                        raise ValueError(f"{name}.{attr}={total} is not divisible by tp={tp_size}")
                    setattr(module, attr, total // tp_size)
    for n, _ in model.named_parameters():
        shard_info.setdefault(n, (None, 0))
    logger.info("apply_tp: %d-way tensor parallelism on %d modules", tp_size,
                sum(1 for n, _ in model.named_modules() if tp_style(n)))
    return shard_info


def apply_sp(model: nn.Module) -> list[str]:
    """Sequence parallelism on top of TP: the residual stream and norms hold seq/tp positions.

    Embedding and row-parallel outputs reduce-scatter along the sequence instead of all-reducing;
    the TP regions (attention, MLP, LM head) all-gather their input. Returns the FQNs of the
    parameters whose gradients must be all-reduced over TP (the norms).
    """
    sp_params = []
    for name, module in model.named_modules():
        if isinstance(module, (RowParallelLinear, VocabParallelEmbedding)):
            module.sequence_parallel = True
        elif isinstance(module, ColumnParallelLinear) and module.input_mode == "copy":
            module.input_mode = "gather_seq"
        elif hasattr(module, "_tp_sequence_parallel"):
            module._tp_sequence_parallel = True
        if tp_style(name) == "replicated":
            sp_params += [f"{name}.{p}" for p, _ in module.named_parameters()]
    logger.info("apply_sp: sequence parallelism, %d norm parameters get a TP gradient all-reduce", len(sp_params))
    return sp_params


def apply_ac(model: nn.Module, mode: str) -> None:
    """Activation recompute. full: every decoder block; selective: only ``core_attention``
    (softmax(qk^T)v, the activation-heavy, FLOP-light part). Names and FQNs are unchanged."""
    count = apply_recompute(list(model.layers.values()), mode)
    if count:
        logger.info("apply_ac: %s recompute on %d blocks", mode, count)


def apply_fsdp(model: nn.Module, dp_mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> None:
    """FSDP2 over the DP mesh: one unit per decoder block plus the root (embedding, norm, head).

    Parameters, gradients and (because the optimizer sees the sharded DTensors) optimizer state
    are sharded over DP. Gradients are reduce-scattered in ``reduce_dtype`` and *summed* (divide
    factor 1): the engine already scales every micro-batch loss by 1/global units.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = []
    for layer in model.layers.values():
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        units.append(layer)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    units.append(model)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        # Plain SUM collectives (a divide factor alone selects PREMUL_SUM, which gloo lacks; on NCCL
        # SUM is also the zero-copy path).
        unit.set_force_sum_reduction_for_comms(True)
    logger.info("apply_fsdp: %d FSDP units over %d DP ranks (param %s, reduce %s)", len(units),
                dp_mesh.size(), param_dtype or "fp32", reduce_dtype)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder block (optional; GPU)."""
    for layer in model.layers.values():
        layer.compile()  # in place: keeps the module names (torch.compile() would add _orig_mod)
    logger.info("apply_compile: compiled %d blocks", len(model.layers))
