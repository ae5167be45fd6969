"""Layers behind the backend seam (``backend.py``): the plain-PyTorch ``local`` backend here,
Transformer Engine / FP8 backends beside it. Models ask ``build_backend(name, ctx)`` for pieces."""
from megatron_phi4.layers.backend import AttentionMetadata, LayerBackend, ParallelContext, build_backend

__all__ = ["AttentionMetadata", "LayerBackend", "ParallelContext", "build_backend"]
