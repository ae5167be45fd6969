"""megatron_phi4: Megatron-style training of Phi-4 (14B).

Kept import-light: ``import megatron_phi4`` loads no torch; ``megatron_phi4.load_model`` imports
what it needs on first use.
"""

__all__ = ["load_model"]


def __getattr__(name):
    if name == "load_model":
        from megatron_phi4.api import load_model

        return load_model
    raise AttributeError(f"module 'megatron_phi4' has no attribute {name!r}")
