"""3D parallelism (tensor + sequence, pipeline, FSDP data parallelism) for Phi-4.

Entry points: ``init_distributed`` / ``ParallelDims`` (layout and process groups) and
``ParallelEngine`` (this rank's model chunks, forward/backward, clipping, shards). See
docs/parallelism.md.
"""
from megatron_phi4.distributed.parallel_dims import ParallelDims, init_distributed

__all__ = ["ParallelDims", "init_distributed", "ParallelEngine", "ShardInfo", "global_units"]


def __getattr__(name):  # the engine imports the model; keep `import megatron_phi4.distributed` light
    if name in ("ParallelEngine", "ShardInfo", "global_units"):
        from megatron_phi4.distributed import engine

        return getattr(engine, name)
    raise AttributeError(name)
