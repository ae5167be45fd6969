"""Sampling from a Phi-4 model: batched, with a KV cache, reproducible per sample, TP-aware.

Entry point: :func:`generate` (``megatron_phi4.generation.generate(model, prompts, *,
max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, num_samples=1, stop_token_ids=None,
seed=None)``). See docs/posttraining.md#generation. Imports torch on first use only.
"""

__all__ = ["generate", "generate_with_params", "Sample", "SamplingParams", "GenerationError",
           "shard_items", "gather_items", "map_over_ranks"]

_WHERE = {
    "generate": "megatron_phi4.generation.decoding",
    "generate_with_params": "megatron_phi4.generation.decoding",
    "Sample": "megatron_phi4.generation.decoding",
    "SamplingParams": "megatron_phi4.generation.sampling",
    "GenerationError": "megatron_phi4.generation.sampling",
    "shard_items": "megatron_phi4.generation.data_parallel",
    "gather_items": "megatron_phi4.generation.data_parallel",
    "map_over_ranks": "megatron_phi4.generation.data_parallel",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'megatron_phi4.generation' has no attribute {name!r}")
