"""AdamW over the engine's parameters, without weight decay on norms, biases and other 1-D tensors.

``torch.optim.AdamW``, ``fused=True`` on CUDA. (apex's FusedAdam is refused by the config: its
step count lives outside the optimizer state this project checkpoints, so it could not resume.)
"""
from __future__ import annotations

import torch


def param_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Two groups: decayed (matrices) and not decayed (norm weights, biases, any 1-D tensor)."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(engine, cfg) -> torch.optim.Optimizer:
    """cfg: OptimizerConfig. The learning rate is set per step by the LR schedule."""
    groups = param_groups(engine.named_parameters(), cfg.weight_decay)
    device = getattr(engine, "device", torch.device("cpu"))
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None)
