"""The engine: this rank's model chunks under TP x PP x DP, built from a model spec on a layer
backend; forward/backward with the global loss scaling, clipping, and the rank's rectangles of the
global tensors for checkpoints. See ``engine.py`` and docs/architecture.md."""
from megatron_phi4.distributed.sharding import ShardInfo
from megatron_phi4.engine.engine import ParallelEngine, global_units

__all__ = ["ParallelEngine", "ShardInfo", "global_units"]
