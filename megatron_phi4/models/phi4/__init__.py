from megatron_phi4.models.phi4.kv_cache import KVCache
from megatron_phi4.models.phi4.model import Phi4Model, build_model, count_parameters

__all__ = ["KVCache", "Phi4Model", "build_model", "count_parameters"]
