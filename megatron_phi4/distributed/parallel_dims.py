"""The 3D layout: world = PP x DP x TP, TP fastest-varying (neighbouring ranks share a node's NVLink).

One object, ``ParallelDims``, owns the ``DeviceMesh`` with dimensions ("pp", "dp", "tp") and hands
out the process groups every other module uses. Global rank ``r`` sits at
``pp_rank = r // (dp * tp)``, ``dp_rank = (r // tp) % dp``, ``tp_rank = r % tp``.

``init_distributed(parallel_cfg, model_cfg)`` validates the layout *before* any process group
exists, picks gloo on CPU / NCCL on CUDA, sets the CUDA device from LOCAL_RANK, applies the
configured collective timeout and prints the layout once (rank 0).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_phi4.config import ModelConfig, ParallelConfig

logger = logging.getLogger(__name__)

MESH_DIMS = ("pp", "dp", "tp")


@dataclass
class ParallelDims:
    """Sizes, this rank's coordinates and the process groups of the 3D layout."""

    tp: int
    pp: int
    dp: int
    mesh: DeviceMesh | None = field(default=None, repr=False)
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    # coordinates ------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    # groups -----------------------------------------------------------------
    def _group(self, dim: str):
        if self.mesh is None:
            return None
        return self.mesh.get_group(dim)

    @property
    def tp_group(self):
        return self._group("tp")

    @property
    def dp_group(self):
        return self._group("dp")

    @property
    def pp_group(self):
        return self._group("pp")

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def tp_dp_group(self):
        """One group over the TP x DP ranks of this pipeline stage (FP8 amax reduction, as Megatron's
        ``get_amax_reduction_group``). Created on first use: a collective, every rank must ask."""
        if self.mesh is None:
            return None
        if self.tp * self.dp == 1:
            return None
        if self.dp == 1:
            return self.tp_group
        if self.tp == 1:
            return self.dp_group
        return self.mesh["dp", "tp"]._flatten("dp_tp").get_group()

    # construction -----------------------------------------------------------
    @classmethod
    def build(cls, parallel_cfg: ParallelConfig, world_size: int | None = None, rank: int | None = None,
              device: torch.device | str | None = None, model_cfg: ModelConfig | None = None) -> "ParallelDims":
        """Validate the layout and build the mesh (a collective: call on every rank)."""
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
        parallel_cfg.validate(model_cfg, world_size)
        dp = parallel_cfg.resolved_dp(world_size)
        device = torch.device(device) if device is not None else default_device()
        mesh = init_device_mesh(device.type, (parallel_cfg.pp, dp, parallel_cfg.tp), mesh_dim_names=MESH_DIMS)
        return cls(tp=parallel_cfg.tp, pp=parallel_cfg.pp, dp=dp, mesh=mesh, rank=rank, device=device)

    def describe(self) -> str:
        lines = [f"parallel layout: world {self.world_size} = pp {self.pp} x dp {self.dp} x tp {self.tp} "
                 f"(tp fastest-varying)"]
        for pp_rank in range(self.pp):
            rows = []
            for dp_rank in range(self.dp):
                rows.append("[" + " ".join(str(self.global_rank(pp_rank, dp_rank, t)) for t in range(self.tp)) + "]")
            lines.append(f"  stage {pp_rank}: dp replicas (tp groups) {' '.join(rows)}")
        return "\n".join(lines)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_backend(parallel_cfg: ParallelConfig) -> str:
    if parallel_cfg.backend != "auto":
        if parallel_cfg.backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("parallel.backend: 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
        return parallel_cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(parallel_cfg: ParallelConfig, model_cfg: ModelConfig | None = None) -> ParallelDims:
    """Initialize torch.distributed from the launcher's environment and return the layout.

    Validation runs first, from WORLD_SIZE alone, so a bad layout fails before any rendezvous.
    Works without a launcher too (world size 1).
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    parallel_cfg.validate(model_cfg, world_size)
    backend = resolve_backend(parallel_cfg)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=parallel_cfg.timeout_minutes),
            device_id=device if backend == "nccl" else None,
        )
    dims = ParallelDims.build(parallel_cfg, world_size, rank, device, model_cfg)
    if rank == 0:
        print(dims.describe() + f"\n  backend {backend}, device {device.type}", flush=True)
    return dims
