"""How a rank's parameters relate to the global tensors a checkpoint stores.

Every parallel layer *declares* its parameters (``param_layout()``): which rows of each local
parameter hold which rectangle of which global tensor, whether the tensor is replicated over the
tensor-parallel group, and whether its gradient is a per-rank partial sum under sequence
parallelism. Nothing downstream (the engine, gradient clipping, checkpoints, the optimizer-state
writer) re-derives sharding from parameter names.

A local parameter may hold several global tensors stacked along its rows (Transformer Engine's
fused QKV weight holds this rank's Q, K and V rows; its fused MLP weight holds gate and up): each
is one ``ParamPiece``. Data parallelism (FSDP2) then splits every local parameter along dim 0
like ``torch.chunk``; ``shard_views`` intersects that row range with each piece and returns, per
global tensor, a *view* into this rank's storage plus the rectangle (``ShardInfo``) it covers.

This module knows no model: a model maps (module path, role) to its global tensor names
(``collect_param_layout``'s ``name_of``), e.g. Phi-4's ``models/phi4/state_dict.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class ShardInfo:
    """The rectangle of the global tensor a local tensor holds."""

    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    replicated: bool  # another rank holds the same data and writes it (write only if False)


@dataclass(frozen=True)
class ParamPiece:
    """Rows ``rows[0]:rows[1]`` of a local parameter hold the rectangle of global tensor ``name``
    that starts at ``global_offset`` (its other dimensions are the local parameter's).

    ``name`` is a role ("weight", "q_proj", "norm") inside the declaring layer until
    ``collect_param_layout`` replaces it by the model's global tensor name.
    ``tp_replicated``: every tensor-parallel rank holds the same values (norm weights).
    ``sp_grad``: replicated, but under sequence parallelism each rank's gradient covers only its
    sequence shard, so gradients are summed over the TP group before use.
    """

    name: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    rows: tuple[int, int]
    tp_replicated: bool = False
    sp_grad: bool = False


Layout = dict[str, list[ParamPiece]]  # local parameter name -> its pieces, in row order


def whole(name: str, shape: Iterable[int], *, tp_dim: int | None = None, tp_offset: int = 0,
          tp_size: int = 1, sp_grad: bool = False) -> ParamPiece:
    """The common case: a local parameter that is one global tensor, split over TP along ``tp_dim``
    (this rank's slice starts at ``tp_offset``) or replicated (``tp_dim=None``)."""
    gshape = tuple(int(s) for s in shape)
    local0 = gshape[0] // tp_size if tp_dim == 0 else gshape[0]
    offset = [0] * len(gshape)
    if tp_dim is not None:
        offset[tp_dim] = tp_offset
    return ParamPiece(name, gshape, tuple(offset), (0, local0), tp_replicated=tp_dim is None, sp_grad=sp_grad)


def stacked(pieces: Iterable[tuple[str, tuple[int, ...], int]], *, tp_offsets: Iterable[int]) -> list[ParamPiece]:
    """Pieces of a fused parameter stacking column-parallel slices along its rows:
    ``pieces`` = (name, global shape, local rows) in row order, ``tp_offsets`` = each slice's
    offset in its global tensor's rows."""
    out, start = [], 0
    for (name, shape, n), off in zip(pieces, tp_offsets):
        shape = tuple(int(s) for s in shape)
        out.append(ParamPiece(name, shape, (off,) + (0,) * (len(shape) - 1), (start, start + n)))
        start += n
    return out


def child_layout(module: nn.Module) -> Layout:
    """A container's layout from its children's: child ``c`` declaring role ``weight`` becomes role
    ``c`` (a NormLinear holding ``norm``, ``q_proj``, ... declares exactly those roles)."""
    layout: Layout = {}
    for cname, child in module.named_children():
        for pname, pieces in child.param_layout().items():
            layout[f"{cname}.{pname}"] = [replace(p, name=cname if p.name == "weight" else f"{cname}.{p.name}")
                                          for p in pieces]
    return layout


def collect_param_layout(model: nn.Module, name_of: Callable[[str, str], str]) -> Layout:
    """{local parameter FQN: pieces with global tensor names} for every parameter of ``model``.

    Walks the module tree down to the modules that declare ``param_layout()`` and asks
    ``name_of(module_path, role)`` for the global name of each role. Every parameter must be
    declared (a layer that forgets one fails here, not in a checkpoint months later).
    """
    layout: Layout = {}

    def visit(module: nn.Module, path: str) -> None:
        if hasattr(module, "param_layout"):
            for pname, pieces in module.param_layout().items():
                fqn = f"{path}.{pname}" if path else pname
                layout[fqn] = [replace(p, name=name_of(path, p.name)) for p in pieces]
            return
        for cname, child in module.named_children():
            visit(child, f"{path}.{cname}" if path else cname)

    visit(model, "")
    undeclared = [n for n, _ in model.named_parameters() if n not in layout]
    if undeclared:
        raise TypeError(f"parameters without a declared layout (their layer lacks param_layout()): {undeclared[:5]}")
    return layout


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The plain local tensor of a parameter (FSDP2 parameters are DTensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


def fsdp_row_range(local_rows: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """Rows of a (TP-)local parameter this DP rank holds under FSDP2 (dim-0 ``torch.chunk`` split)."""
    chunk = math.ceil(local_rows / dp_size)
    start = min(dp_rank * chunk, local_rows)
    return start, min(start + chunk, local_rows)


@dataclass(frozen=True)
class ShardCoordinates:
    """Where this rank sits, as far as rectangles are concerned."""

    tp_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    fsdp: bool = False  # parameters split over DP (else replicated over DP)

    def replicated(self, piece: ParamPiece) -> bool:
        return (piece.tp_replicated and self.tp_rank > 0) or (not self.fsdp and self.dp_rank > 0)


def shard_views(tensors: dict[str, torch.Tensor], layout: Layout, where: ShardCoordinates, *,
                suffix: str = "") -> dict[str, tuple[torch.Tensor, ShardInfo]]:
    """{global name + suffix: (view into the local tensor, ShardInfo)} for tensors shaped like the
    local parameters (the parameters themselves, or optimizer moments). Views share storage:
    loading into them writes the parameters/state in place."""
    out: dict[str, tuple[torch.Tensor, ShardInfo]] = {}
    for fqn, tensor in tensors.items():
        pieces = layout[fqn]
        local = local_tensor(tensor)
        tp_rows = pieces[-1].rows[1]
        a, b = fsdp_row_range(tp_rows, where.dp_rank, where.dp_size) if where.fsdp else (0, tp_rows)
        for piece in pieces:
            s, e = max(piece.rows[0], a), min(piece.rows[1], b)
            offset = list(piece.global_offset)
            if e <= s:  # this DP rank holds no row of this piece: an empty rectangle
                view = local[0:0]
                offset[0] += piece.rows[1] - piece.rows[0]
                offset[0] = min(offset[0], piece.global_shape[0])
            else:
                view = local[s - a:e - a]
                offset[0] += s - piece.rows[0]
            out[piece.name + suffix] = (view, ShardInfo(piece.global_shape, tuple(offset), where.replicated(piece)))
    return out


def sp_grad_params(layout: Layout) -> list[str]:
    """Local parameter FQNs whose gradients must be summed over TP (sequence-parallel norms)."""
    return [fqn for fqn, pieces in layout.items() if any(p.sp_grad for p in pieces)]


def tp_replicated_params(layout: Layout) -> set[str]:
    """Local parameter FQNs whose values are identical on every TP rank (counted once in norms)."""
    return {fqn for fqn, pieces in layout.items() if all(p.tp_replicated for p in pieces)}
