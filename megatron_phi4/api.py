"""Public single-process entry points."""
from __future__ import annotations

import os

import torch


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, backend: str | None = None):
    """A plain ``Phi4Model`` in eval mode from any project checkpoint.

    ``path``: a checkpoint directory (weights-only or a training checkpoint, saved by any TP/PP/DP
    layout), or a run checkpoint root whose ``latest`` file names one. ``dtype``: None keeps the
    dtype the weights are stored in (that of ``embed_tokens.weight``: bf16 for an imported release,
    fp32 for a training checkpoint's master weights). The model is built on the meta device and
    the checkpoint is read straight into its tensors (no second copy). ``backend``: the layer
    backend to build (default: the one the checkpoint was trained with if it can be used here, else
    "local"); checkpoint names are backend-independent, so any backend loads any checkpoint. FP8
    training settings are dropped: the returned model computes in ``dtype``.
    """
    import dataclasses

    from megatron_phi4.config import FP8Config
    from megatron_phi4.registry import BACKENDS

    from megatron_phi4.checkpoint import format as ckpt_format
    from megatron_phi4.models.phi4.model import Phi4Model

    ckpt = ckpt_format.resolve_checkpoint(path)
    meta = ckpt_format.read_meta(ckpt)
    cfg = ckpt_format.model_config_from_meta(meta)
    if backend is None:
        backend = cfg.backend if BACKENDS.unavailable_reason(cfg.backend) is None else "local"
    cfg = dataclasses.replace(cfg, backend=backend, fp8=FP8Config())
    cfg.validate("model")
    if dtype is None:
        tmeta = ckpt_format.checkpoint_tensor_meta(ckpt)
        if "embed_tokens.weight" in tmeta:
            dtype = tmeta["embed_tokens.weight"][1]
        else:
            dtype = next((d for _, d in tmeta.values() if d.is_floating_point), torch.float32)
    with torch.device("meta"):
        model = Phi4Model(cfg).to(dtype)  # cast while still on meta: one allocation, in `dtype`
    model.to_empty(device=device)
    ckpt_format.load_into(model, ckpt, strict=True)
    return model.eval()
