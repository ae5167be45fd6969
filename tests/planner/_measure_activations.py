"""Measure one training micro-batch's peak host memory above the steady state (run in a fresh process).

    python tests/planner/_measure_activations.py '{"config": {...}, "tp": 1, "sequence_parallel": false,
                                                   "batch": 1, "seq": 512, "recompute": "none",
                                                   "documents": 1}'

prints one JSON line: a list, per TP rank, of ``{"baseline": RSS bytes, "peak": VmHWM bytes,
"delta": peak - baseline}``.

Method: ``tp`` gloo ranks are forked from this fresh process (``tests/distributed_utils``); each
builds the trainer's ``ParallelEngine`` (fp32, ``dp_shard='none'``: no FSDP buffers, parameters
used in place), runs one forward/backward and an AdamW step so that gradients and optimizer state
exist, zeroes the gradients *in place* (they stay allocated), takes RSS as the baseline, resets
the kernel's RSS high-water mark (``/proc/self/clear_refs`` <- 5) and runs a second
forward/backward. glibc is told (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, before anything is
allocated) to serve every tensor above 64 KiB with its own mmap and to unmap it on free, so RSS
follows live tensor bytes instead of the high-water mark of heap arenas.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import sys

M_MMAP_THRESHOLD = -3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rank(rank, world, spec):
    import torch

    from megatron_phi4.config import ModelConfig, ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    cfg = ModelConfig(**spec["config"])
    pcfg = ParallelConfig(tp=spec.get("tp", 1), pp=spec.get("pp", 1), sequence_parallel=spec["sequence_parallel"],
                          recompute=spec["recompute"], dp_shard=spec.get("dp_shard", "none"), mixed_precision="fp32")
    dims = ParallelDims.build(pcfg, model_cfg=cfg)
    engine = ParallelEngine(cfg, pcfg, dims, seed=0)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"] + 1), generator=g)
    mb = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
          "position_ids": torch.arange(spec["seq"]).expand(spec["batch"], -1).contiguous()}
    docs = spec.get("documents", 1)
    if docs > 1:  # packed rows: `docs` equal documents per row (attention's per-document path)
        length = spec["seq"] // docs
        mb["document_ids"] = (torch.arange(spec["seq"]) // length).expand(spec["batch"], -1).contiguous()
        mb["position_ids"] = (torch.arange(spec["seq"]) % length).expand(spec["batch"], -1).contiguous()
    mbs = [dict(mb) for _ in range(spec.get("microbatches", 1))]
    loss_fn = LMLoss()
    units = engine.global_units(mbs, loss_fn)
    engine.forward_backward(mbs, loss_fn, units)
    opt.step()
    engine.zero_grad(set_to_none=False)
    gc.collect()
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    engine.forward_backward(mbs, loss_fn, units)
    peak = _status("VmHWM")
    return {"baseline": baseline, "peak": peak, "delta": peak - baseline, "pp_rank": dims.pp_rank,
            "dp_rank": dims.dp_rank, "tp_rank": dims.tp_rank}


def main(spec: dict) -> list[dict]:
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
    from tests.distributed_utils import run_distributed

    world = spec.get("tp", 1) * spec.get("pp", 1) * spec.get("dp", 1)
    return run_distributed(_rank, world, spec, timeout=300)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
