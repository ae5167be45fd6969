"""Phi-4's model spec (see ``megatron_phi4.models.spec``): registered as ``model.arch: phi4``."""
from __future__ import annotations

from megatron_phi4.models.phi4.model import Phi4Model, init_parameter_
from megatron_phi4.models.phi4.state_dict import global_shapes
from megatron_phi4.models.spec import ModelSpec


def _build(cfg, backend, layer_ids, embedding, head) -> Phi4Model:
    return Phi4Model(cfg, backend, layer_ids=layer_ids, embedding=embedding, head=head)


PHI4_SPEC = ModelSpec(
    name="phi4",
    build=_build,
    global_shapes=global_shapes,
    init_tensor=init_parameter_,
    blocks=lambda model: list(model.layers.values()),
    # softmax(q k^T) v: few FLOPs for its activations (the fused kernels keep them O(seq): output + lse)
    selective_recompute=lambda block: [block.attention.core],
)
