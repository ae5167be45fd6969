"""Public single-process entry points."""
from __future__ import annotations

import os

import torch


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None):
    """A plain ``Phi4Model`` in eval mode from any project checkpoint.

    ``path``: a checkpoint directory (weights-only or a training checkpoint, saved by any TP/PP/DP
    layout), or a run checkpoint root whose ``latest`` file names one. ``dtype``: None keeps the
    dtype the weights are stored in (that of ``embed_tokens.weight``: bf16 for an imported release,
    fp32 for a training checkpoint's master weights). The model is built on the meta device and
    the checkpoint is read straight into its tensors (no second copy).
    """
    from megatron_phi4.checkpoint import format as ckpt_format
    from megatron_phi4.models.phi4.model import Phi4Model

    ckpt = ckpt_format.resolve_checkpoint(path)
    meta = ckpt_format.read_meta(ckpt)
    cfg = ckpt_format.model_config_from_meta(meta)
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
