"""What each rank of a layout holds: tensors, their TP-local shapes and the FSDP units.

The global tensors and their initialization order come from the model spec
(``spec.global_shapes``), the stage split from the pipeline's own ``split_layers`` and
``stages_of_rank``, so the planner cannot drift from the engine on *which* tensors a rank owns.
How a tensor is cut over the TP group is the tensor-parallel plan of the layers: the planner keeps
it as a small table per architecture (``TP_SPLIT_DIM``), because the layers declare their sharding
only once built for a real TP process group. ``tests/planner/test_state_bytes.py`` builds real
engines and checks the table against what they allocate, byte for byte.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from megatron_phi4.config import ModelConfig
from megatron_phi4.distributed.pipeline import split_layers, stages_of_rank
from megatron_phi4.distributed.sharding import fsdp_row_range
from megatron_phi4.planner.layout import Layout

# Checkpoint-name suffix -> dimension split over TP (None: replicated), as the local backend's
# layers declare it: column-parallel q/k/v/gate/up and the LM head cut output rows (dim 0),
# row-parallel o/down cut input columns (dim 1), the vocabulary-parallel embedding cuts rows,
# RMSNorm weights are replicated.
TP_SPLIT_DIM: dict[str, dict[str, int | None]] = {
    "phi4": {
        "embed_tokens.weight": 0, "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
        "o_proj.weight": 1, "gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1,
        "lm_head.weight": 0, "norm.weight": None,
    },
}


def tp_split_dim(arch: str, name: str) -> int | None:
    table = TP_SPLIT_DIM.get(arch)
    if table is None:
        raise KeyError(f"model.arch: the planner has no tensor-parallel table for {arch!r} "
                       f"(known: {', '.join(TP_SPLIT_DIM)}); add one to megatron_phi4/planner/model_shapes.py")
    for suffix, dim in table.items():
        if name.endswith(suffix):
            return dim
    raise KeyError(f"planner: no tensor-parallel rule for tensor {name!r} of arch {arch!r}")


@dataclass(frozen=True)
class LocalTensor:
    """One parameter as a TP rank holds it (the local backend keeps one parameter per checkpoint tensor)."""

    name: str
    shape: tuple[int, ...]  # TP-local shape, before FSDP
    unit: str  # FSDP unit: "layers.<i>" or "root:<chunk>"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    def fsdp_rows(self, dp_rank: int, dp: int) -> int:
        a, b = fsdp_row_range(self.shape[0], dp_rank, dp)
        return b - a

    def fsdp_padded_rows(self, dp: int) -> int:
        """Rows of FSDP2's padded shard (every rank allocates this many: ``chunks[0]`` of ``torch.chunk``)."""
        return math.ceil(self.shape[0] / dp)


@dataclass(frozen=True)
class Chunk:
    """One model chunk (pipeline stage) of a rank."""

    stage: int
    layers: tuple[int, ...]
    embedding: bool
    head: bool
    tensors: tuple[LocalTensor, ...]

    def unit_numels(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.unit] = out.get(t.unit, 0) + t.numel
        return out


@functools.lru_cache(maxsize=1024)
def _split(num_layers: int, stages: int, embedding_cost: float, head_cost: float) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(s) for s in split_layers(num_layers, stages, None, embedding_cost, head_cost))


def layer_split(model: ModelConfig, layout: Layout) -> list[list[int]]:
    """The engine's own split (``pipeline.split_layers``: min-max cost, embedding/head charged)."""
    return [list(s) for s in _split(model.num_layers, layout.num_stages, layout.pp_embedding_cost,
                                    layout.pp_head_cost)]


def rank_chunks(model: ModelConfig, layout: Layout, pp_rank: int) -> list[Chunk]:
    """The chunks pipeline rank ``pp_rank`` builds, with TP-local tensor shapes (cached: the planner
    asks for the same split many times)."""
    key = (_model_key(model), layout.tp, layout.pp, layout.chunks, layout.pp_embedding_cost, layout.pp_head_cost,
           pp_rank)
    if key not in _CACHE:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = tuple(_rank_chunks(model, layout, pp_rank))
    return list(_CACHE[key])


_CACHE: dict = {}


def _model_key(model: ModelConfig) -> str:
    return repr(dataclasses.asdict(model))  # nested sections (model.fp8) are not hashable


def _rank_chunks(model: ModelConfig, layout: Layout, pp_rank: int) -> list[Chunk]:
    from megatron_phi4.models.spec import model_spec

    shapes = model_spec(model).global_shapes(model)
    split = layer_split(model, layout)
    chunks = []
    for sid in stages_of_rank(pp_rank, layout.pp, layout.chunks):
        embedding, head = sid == 0, sid == layout.num_stages - 1
        layers = set(split[sid])
        tensors = []
        for name, shape in shapes.items():
            if name.startswith("layers."):
                idx = int(name.split(".")[1])
                if idx not in layers:
                    continue
                unit = f"layers.{idx}"
            elif name.startswith("embed_tokens"):
                if not embedding:
                    continue
                unit = f"root:{sid}"
            else:  # final norm, LM head
                if not head:
                    continue
                unit = f"root:{sid}"
            dim = tp_split_dim(model.arch, name)
            local = list(shape)
            if dim is not None:
                if local[dim] % layout.tp:
                    raise ValueError(f"{name}: dimension {dim} of {tuple(shape)} is not divisible by tp={layout.tp}")
                local[dim] //= layout.tp
            tensors.append(LocalTensor(name, tuple(local), unit))
        chunks.append(Chunk(sid, tuple(split[sid]), embedding, head, tuple(tensors)))
    return chunks
