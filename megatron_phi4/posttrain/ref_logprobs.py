"""Reference log-probs computed once, in parallel, before a DPO stage.

A DPO stage needs log p_ref(completion | prompt) for both completions of every pair. The trainer
can run a frozen copy of the reference beside the policy (``loss.dpo_reference: model``), which
costs a second forward pass on every step and a second copy of the weights; or the values can be
computed once, here, and read from beside the data (``loss.dpo_reference: precomputed``).

``precompute_ref_logprobs`` runs the reference checkpoint under any TP x PP x DP layout (one
process, or ``torchrun``): pairs are cut into blocks, blocks are dealt to data-parallel replicas,
each block's result is written as its own file as soon as it is done (a killed run loses at most
the blocks in flight and continues where it stopped), and rank 0 finally writes
``<data>.ref_logps.npz`` atomically, with the checkpoint's fingerprint and the sequence length. The
trainer refuses a sidecar whose fingerprint is not that of the stage's initial checkpoint.

Pairs are collated exactly as the trainer collates them (``PreferenceCollate``: same truncation,
same padding), so the values equal what a frozen reference model computes during training.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def _bcast(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _blocks(n_pairs: int, pairs_per_block: int) -> list[tuple[int, int]]:
    return [(a, min(a + pairs_per_block, n_pairs)) for a in range(0, n_pairs, pairs_per_block)]


def _block_logps(engine, ds, collate, start: int, end: int, mbs: int) -> np.ndarray:
    """(end - start, 2) reference log-probs of pairs [start, end); the last micro-batch is padded
    with copies of the last pair (the pipeline needs one shape) and the copies are dropped."""
    idx = list(range(start, end))
    idx += [end - 1] * (-len(idx) % mbs)
    microbatches = [collate([ds[i] for i in idx[a:a + mbs]]) for a in range(0, len(idx), mbs)]
    rows = engine.sequence_log_probs(microbatches)
    out = np.concatenate([np.stack([r[:mbs].numpy(), r[mbs:].numpy()], axis=1) for r in rows])
    return out[:end - start].astype(np.float64)


def precompute_ref_logprobs(checkpoint, data_paths, *, seq_length: int, engine, micro_batch_size: int = 1,
                            pairs_per_block: int = 64, pad_id: int | None = None, max_blocks: int | None = None,
                            log=print) -> list[str]:
    """Write ``<path>.ref_logps.npz`` for every preference file/prefix in ``data_paths`` with the
    weights ``engine`` holds (those of ``checkpoint``). Collective: every rank calls it. Returns
    the sidecar paths (empty for paths left unfinished because of ``max_blocks``)."""
    from megatron_phi4.checkpoint.format import checkpoint_fingerprint
    from megatron_phi4.data.preference import PreferenceDataset, write_ref_logps
    from megatron_phi4.data.sources import PreferenceCollate
    from megatron_phi4.tokenizer import PAD_ID, PHI4_VOCAB_SIZE

    dims = engine.dims
    rank0 = dims.rank == 0
    writer = dims.tp_rank == 0 and dims.pp_rank == 0  # one writer per data-parallel replica
    fingerprint = checkpoint_fingerprint(checkpoint)
    if pairs_per_block % micro_batch_size:
        raise ValueError(f"--pairs-per-block {pairs_per_block} must be a multiple of --micro-batch-size "
                         f"{micro_batch_size}")
    collate = PreferenceCollate(PAD_ID if pad_id is None else pad_id, seq_length)
    written, budget = [], max_blocks
    engine.eval()
    for path in map(str, data_paths):
        ds = PreferenceDataset(path, vocab_size=max(engine.model_cfg.vocab_size, PHI4_VOCAB_SIZE))
        blocks = _blocks(len(ds), pairs_per_block)
        parts = Path(f"{path}.ref_logps.parts-{fingerprint}-{seq_length}")
        if rank0:
            parts.mkdir(parents=True, exist_ok=True)
        todo = _bcast([k for k in range(len(blocks)) if not (parts / f"block_{k:06d}.npy").exists()] if rank0 else None)
        if rank0 and len(todo) < len(blocks):
            log(f"{path}: {len(blocks) - len(todo)} of {len(blocks)} block(s) already done, continuing")
        mine = [k for j, k in enumerate(todo) if j % dims.dp == dims.dp_rank]
        if budget is not None:  # per replica (replicas share no collective inside a block)
            mine, budget = mine[:budget], budget - len(mine[:budget])
        t0 = time.time()
        for n, k in enumerate(mine, 1):
            a, b = blocks[k]
            with torch.no_grad():
                values = _block_logps(engine, ds, collate, a, b, micro_batch_size)
            if writer:
                tmp = parts / f".block_{k:06d}.{os.getpid()}.npy"
                np.save(tmp, values)
                os.replace(tmp, parts / f"block_{k:06d}.npy")
            if rank0:
                log(f"{path}: block {n}/{len(mine)} of this replica (pairs {a}-{b - 1}) done, "
                    f"{n * pairs_per_block / max(time.time() - t0, 1e-9):.1f} pairs/s")
        _barrier()
        done = all((parts / f"block_{k:06d}.npy").exists() for k in range(len(blocks))) if rank0 else None
        if rank0 and done:
            values = np.concatenate([np.load(parts / f"block_{k:06d}.npy") for k in range(len(blocks))])
            meta = {"model_fingerprint": fingerprint, "checkpoint": str(checkpoint), "seq_length": int(seq_length),
                    "pairs": len(ds), "layout": {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp}}
            written.append(write_ref_logps(path, values[:, 0], values[:, 1], meta))
            shutil.rmtree(parts, ignore_errors=True)
            log(f"{path}: wrote {written[-1]} ({len(ds)} pairs)")
        _barrier()
    return _bcast(written)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="precompute_ref_logprobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the reference model: the DPO stage's initial checkpoint")
    p.add_argument("--data", required=True, nargs="+", help="preference JSONL files or binary prefixes")
    p.add_argument("--seq-length", type=int, required=True, help="the DPO stage's data.seq_length")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per forward pass")
    p.add_argument("--pairs-per-block", type=int, default=256, help="pairs per resumable unit of work")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--pad-id", type=int, default=None, help="padding id (default: the tokenizer's pad)")
    p.add_argument("--max-blocks", type=int, default=None, help="stop after this many blocks per replica")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_phi4.checkpoint.format import CheckpointError, model_config_from_meta, read_meta, resolve_checkpoint
    from megatron_phi4.checkpoint.manager import load_model_weights_into
    from megatron_phi4.config import ConfigError, ParallelConfig
    from megatron_phi4.distributed import init_distributed
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.logs import configure_logging

    configure_logging()
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        cfg = model_config_from_meta(read_meta(ckpt))
        for path in args.data:
            if not (os.path.isfile(path) or os.path.exists(path + "_prompt.idx")):
                raise ConfigError(f"--data: {path}: neither a JSONL file nor a binary prefix")
        pcfg = ParallelConfig(tp=args.tp, pp=args.pp, dp_shard="none")
        pcfg.validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except (CheckpointError, ConfigError) as e:
        print(f"precompute_ref_logprobs: {e}", file=sys.stderr)
        return 2
    dims = init_distributed(pcfg, cfg)
    engine = ParallelEngine(cfg, pcfg, dims)
    load_model_weights_into(ckpt, engine)
    precompute_ref_logprobs(ckpt, args.data, seq_length=args.seq_length, engine=engine,
                            micro_batch_size=args.micro_batch_size, pairs_per_block=args.pairs_per_block,
                            pad_id=args.pad_id, max_blocks=args.max_blocks,
                            log=(lambda m: print(m, flush=True)) if dims.rank == 0 else (lambda m: None))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from megatron_phi4.process import run_and_exit

    run_and_exit(main)  # no interpreter finalization under gloo (megatron_phi4/process.py)
