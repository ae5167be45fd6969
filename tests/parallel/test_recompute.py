"""Recompute really re-runs the forward: count how often each piece's forward executes in one
training step (once without recompute; the recomputed pieces once more during backward)."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("mode,attn_runs,mlp_runs", [("none", 1, 1), ("selective", 2, 1), ("full", 2, 2)])
def test_recompute_reruns_exactly_the_named_pieces(mode, attn_runs, mlp_runs, monkeypatch):
    from megatron_phi4.config import ParallelConfig, model_preset
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.layers import local
    from megatron_phi4.losses import LMLoss

    calls = {"attn": 0, "mlp": 0}
    for cls, key in ((local.SDPAttention, "attn"), (local.NormSwiGLU, "mlp")):
        original = cls.forward

        def counted(self, *args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)  # before the engine wraps instances' forward
    cfg = model_preset("tiny", num_layers=3)
    engine = ParallelEngine(cfg, ParallelConfig(dp_shard="none", recompute=mode), ParallelDims(1, 1, 1), seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    engine.forward_backward([mb], LMLoss(), engine.global_units([mb], LMLoss()))
    assert calls == {"attn": attn_runs * cfg.num_layers, "mlp": mlp_runs * cfg.num_layers}
    assert all(p.grad is not None for p in engine.parameters())
