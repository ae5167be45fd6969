"""Shared pieces of the parallel-vs-single-process parity tests (not a test module)."""
from __future__ import annotations

import torch

from megatron_phi4.config import ParallelConfig, model_preset
from megatron_phi4.losses import DPOLoss, LMLoss
from megatron_phi4.losses.dpo_objectives import BATCH_SORTED_TYPES, LABEL_SMOOTHING_TYPES

SEQ = 16
LR = 1e-3
ADAM_EPS = 1e-6
MAX_NORM = 0.5  # small enough that clipping is active for the tiny model


def tiny_cfg():
    # 5-token logits chunks: every engine run below applies the head in several chunks (crossing row
    # boundaries), while the single-process reference computes whole logits: the parity suite also
    # proves the chunked head + loss under every layout.
    return model_preset("tiny", num_layers=4, logits_chunk_tokens=5)


def make_lm_microbatches(n: int, mb_size: int = 1, seq: int = SEQ, seed: int = 0, packed: bool = False):
    cfg = tiny_cfg()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (mb_size, seq + 1), generator=g)
        mask = (torch.rand(mb_size, seq, generator=g) > 0.3).float()
        mb = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "loss_mask": mask}
        if packed:  # two documents per row, positions restart at the boundary
            cut = int(torch.randint(3, seq - 3, (1,), generator=g))
            doc = (torch.arange(seq) >= cut).long().expand(mb_size, seq).contiguous()
            pos = torch.where(doc == 0, torch.arange(seq), torch.arange(seq) - cut).contiguous()
            mb["document_ids"], mb["position_ids"] = doc, pos
        out.append(mb)
    return out


def make_dpo_microbatches(n: int, pairs: int = 1, seq: int = SEQ, seed: int = 0, unit_weights: bool = False):
    cfg = tiny_cfg()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (2 * pairs, seq + 1), generator=g)
        mask = torch.zeros(2 * pairs, seq)
        mask[:, seq // 2:] = 1.0
        out.append({
            "input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "loss_mask": mask,
            "ref_chosen_logp": -torch.rand(pairs, generator=g) * 50 - 60,
            "ref_rejected_logp": -torch.rand(pairs, generator=g) * 50 - 60,
            "weight": torch.ones(pairs) if unit_weights else torch.rand(pairs, generator=g) + 0.5,
        })
    return out


def dpo_loss_type(kind: str) -> str | None:
    """``"dpo"`` -> sigmoid, ``"dpo:<type>"`` -> that DPO loss type (``"+sft"``: with TRL's sft term
    at weight 0.5); None for LM kinds."""
    if not kind.startswith("dpo"):
        return None
    return kind.partition(":")[2].partition("+")[0] or "sigmoid"


def make_loss(kind: str):
    loss_type = dpo_loss_type(kind)
    if loss_type is None:
        return LMLoss()
    return DPOLoss(beta=0.1, loss_type=loss_type, label_smoothing=0.1 if loss_type in LABEL_SMOOTHING_TYPES else 0.0,
                   sft_weight=0.5 if kind.endswith("+sft") else 0.0)


def make_steps(kind: str, steps: int, n_global_mb: int, packed: bool = False):
    loss_type = dpo_loss_type(kind)
    if loss_type is not None:
        # "dpo:<type>" kinds put 2 pairs in a micro-batch (so aot's sort has something to sort)
        pairs = 1 if kind == "dpo" else 2
        return [make_dpo_microbatches(n_global_mb, pairs=pairs, seed=100 + s,
                                      unit_weights=loss_type in BATCH_SORTED_TYPES) for s in range(steps)]
    return [make_lm_microbatches(n_global_mb, seed=100 + s, packed=packed) for s in range(steps)]


def reference_run(kind: str, steps_data, seed: int = 0):
    """Single-process training: per-step loss, grad norm, final parameters."""
    from megatron_phi4.models.phi4.model import build_model

    cfg = tiny_cfg()
    model = build_model(cfg, "cpu", seed)
    loss_fn = make_loss(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    losses, norms = [], []
    for mbs in steps_data:
        opt.zero_grad(set_to_none=True)
        units = float(sum(float(loss_fn.units(mb)) for mb in mbs))
        total = 0.0
        for mb in mbs:
            logits = model(mb["input_ids"], position_ids=mb.get("position_ids"), document_ids=mb.get("document_ids"))
            out = loss_fn(logits, mb)
            (out.loss_sum / units).backward()
            total += float(out.loss_sum.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        losses.append(total / units)
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def parallel_run(rank, world_size, layout: dict, kind: str, steps_data, n_mb_per_rank: int, seed: int = 0):
    """One rank of the same training under ``layout`` (ParallelConfig kwargs)."""
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims

    cfg = tiny_cfg()
    layout = dict(layout)
    engine_kwargs = layout.pop("engine_kwargs", {})
    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.build(pcfg, model_cfg=cfg)
    engine = ParallelEngine(cfg, pcfg, dims, seed=seed, **engine_kwargs)
    loss_fn = make_loss(kind)
    opt = torch.optim.AdamW(engine.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    losses, norms = [], []
    for mbs in steps_data:
        mine = mbs[dims.dp_rank * n_mb_per_rank:(dims.dp_rank + 1) * n_mb_per_rank]
        opt.zero_grad(set_to_none=True)
        units = engine.global_units(mine, loss_fn)
        out = engine.forward_backward(mine, loss_fn, units)
        norms.append(engine.clip_grad_norm_(MAX_NORM))
        opt.step()
        losses.append(out["loss"])
    full = engine.full_state_dict()
    return losses, norms, full if rank == 0 else None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
