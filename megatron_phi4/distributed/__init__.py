"""Model-agnostic parallelism: the 3D layout and its process groups, Megatron-style TP/SP layers
and collectives, vocabulary-parallel log-probs, pipeline schedules, FSDP2 over DP, recompute,
global gradient clipping, and the sharding declarations layers make (``sharding.py``).

Nothing here imports a model or a loss: the engine (``megatron_phi4.engine``) binds them. See
docs/parallelism.md.
"""
from megatron_phi4.distributed.parallel_dims import ParallelDims, init_distributed

__all__ = ["ParallelDims", "init_distributed"]
