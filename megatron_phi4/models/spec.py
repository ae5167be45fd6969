"""A model spec binds a model to what the engine needs to know about it, and nothing more.

The engine (``megatron_phi4.engine``) is written against this object, never against a model
class (torchtitan's ``ModelSpec`` idea): how to build the part of the model a pipeline stage owns
on a given layer backend, the stable checkpoint names and shapes (in initialization order) with
the initialization rule, and which submodules are the repeated blocks (FSDP units, full recompute,
``torch.compile``) and which pieces of a block selective recompute re-runs. The tensor-parallel
plan lives in the layers the model asks its backend for (each declares its sharding), and the
checkpoint names in the model's state-dict mapping. Specs are registered by name in
``megatron_phi4.registry.MODELS`` (``model.arch``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from megatron_phi4.config import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # build(cfg, backend, layer_ids, embedding, head) -> module; forward(tokens_or_hidden, position_ids=,
    # document_ids=, labels=) -> logits (this rank's vocabulary shard), or with ``labels`` fp32 log
    # p(labels) (batch, seq) computed by the head chunk by chunk, or hidden states where the module has
    # no head; ``checkpoint_layout()`` names its parameters; ``set_rope_theta`` if the model has a RoPE
    # base a stage may change.
    build: Callable[..., nn.Module]
    global_shapes: Callable[[ModelConfig], dict[str, tuple[int, ...]]]
    init_tensor: Callable[[str, torch.Tensor, ModelConfig, torch.Generator | None], torch.Tensor]
    blocks: Callable[[nn.Module], list[nn.Module]]
    selective_recompute: Callable[[nn.Module], Iterable[nn.Module]]

    def build_stage(self, cfg: ModelConfig, backend, layer_ids, *, embedding: bool, head: bool) -> nn.Module:
        return self.build(cfg, backend, layer_ids, embedding, head)


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The registered spec of ``cfg.arch``."""
    from megatron_phi4.registry import MODELS

    return MODELS.get(cfg.arch, "model.arch")
