#!/usr/bin/env python
"""Per-rank peak memory of building a stage's index arrays on 8 ranks: every rank in memory
(BEFORE, ``cache_dir=None``) versus one build in a shared cache that the other ranks memory-map
(AFTER, :func:`megatron_phi4.data.cache.build_collectively`).

The corpus is a real ``.idx`` of ``--docs`` documents with log-normal lengths (mean
``--mean-tokens``) and a sparse ``.bin`` of the matching size (no token is written or read: index
building needs the lengths only). Each rank is a process forked from this one, joined in a gloo
process group, and calls :func:`~megatron_phi4.data.stage.build_stage_data` for a pre-training
stage over that corpus, exactly as the trainer does. Per rank it reports

* peak RSS: the ``VmHWM`` high-water mark, reset (``/proc/self/clear_refs`` 5) right before the
  build, minus the RSS at that moment (pages inherited from this process are not counted). It
  also counts file pages the rank touched -- the ``.idx`` it validates on open, the mapped cache
  -- which all ranks share through the page cache;
* peak anon: the largest ``RssAnon`` (private memory) above the same baseline, sampled every 2 ms
  by a thread during the build (a sample can miss a spike shorter than that);
* anon held: ``RssAnon`` above the baseline after the build -- the rank's private copy of the
  index arrays, kept for the whole stage.

    python benchmarks/index_cache_memory.py                # 10M documents, 8 ranks
    python benchmarks/index_cache_memory.py --docs 2M      # quick
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_phi4.data.mixture_report import format_count, parse_count  # noqa: E402


def write_corpus(prefix: str, n: int, mean: float, seed: int = 0) -> int:
    """A megatron ``.idx`` for ``n`` documents (int32 tokens) and a sparse ``.bin`` of the size it
    describes; returns the number of tokens."""
    from megatron_phi4.data.indexed import DTYPE_CODES, INDEX_HEADER, INDEX_VERSION
    rng = np.random.default_rng(seed)
    sigma = 1.2
    lengths = np.clip(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n), 1, 1 << 20
                      ).astype("<i4")
    tokens = int(lengths.sum(dtype=np.int64))
    with open(prefix + ".idx", "wb") as f:
        f.write(struct.pack("<9sQBQQ", INDEX_HEADER, INDEX_VERSION, DTYPE_CODES[np.dtype(np.int32)],
                            n, n + 1))
        f.write(lengths.tobytes())
        step = 1 << 22
        base = 0
        for a in range(0, n, step):  # pointers: byte offsets, in chunks
            c = lengths[a:a + step].astype(np.int64) * 4
            ptr = np.cumsum(c) - c + base
            base = int(ptr[-1] + c[-1])
            f.write(ptr.astype("<i8").tobytes())
        for a in range(0, n + 1, step):
            f.write(np.arange(a, min(a + step, n + 1), dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(tokens * 4)  # sparse: occupies no disk
    return tokens


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _rank(rank, world, port, stage, steps, cache_dir, conn):
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from megatron_phi4.data.stage import build_stage_data
        # warm up the collectives build_collectively uses, so their one-time buffers are baseline
        dist.all_reduce(torch.ones(1, dtype=torch.int32), op=dist.ReduceOp.MIN)
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status()
        peak_anon = [0]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.002):
                peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.perf_counter()
        data = build_stage_data(stage, rank, world, 0, steps, cache_dir=cache_dir)
        data.next_global_batch()  # and read a batch, as training would
        dt = time.perf_counter() - t
        stop.set()
        sampler.join()
        st = _status()
        dist.barrier()  # everyone keeps its arrays until all are measured
        conn.send({"peak": st["VmHWM"] - base["VmRSS"], "anon": st["RssAnon"] - base["RssAnon"],
                   "peak_anon": max(peak_anon[0], st["RssAnon"]) - base["RssAnon"],
                   "seconds": dt})
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        conn.send({"error": f"rank {rank}: {type(e).__name__}: {e}"})
    os._exit(0)


def run(world, stage, steps, cache_dir):
    ctx = mp.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pipes, procs = [], []
    for r in range(world):
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank, args=(r, world, port, stage, steps, cache_dir, b))
        p.start()
        pipes.append(a)
        procs.append(p)
    res = [c.recv() for c in pipes]
    for p in procs:
        p.join()
    for r in res:
        if "error" in r:
            raise SystemExit(r["error"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", default="10M", help="documents in the corpus (e.g. 20M)")
    ap.add_argument("--mean-tokens", type=float, default=128)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    import torch.distributed  # noqa: F401 - imported once here, not in every forked rank
    import yaml

    from megatron_phi4.config import DataConfig, LossConfig, StageConfig
    from megatron_phi4.data.stage import build_stage_data  # noqa: F401

    n = parse_count(args.docs)
    work = args.dir or tempfile.mkdtemp(prefix="index_cache_memory_")
    os.makedirs(work, exist_ok=True)
    try:
        prefix = os.path.join(work, "corpus")
        t = time.perf_counter()
        tokens = write_corpus(prefix, n, args.mean_tokens)
        mix = os.path.join(work, "mix.yaml")
        with open(mix, "w") as f:
            yaml.safe_dump({"sources": [{"name": "web", "weight": 1.0, "paths": [prefix]}]}, f)
        W = args.ranks
        stage = StageConfig(name="pretrain", data=DataConfig(
            kind="pretrain", mixture=mix, seq_length=args.seq_length, micro_batch_size=1,
            global_batch_size=W, seed=1234), loss=LossConfig(type="lm"), train_steps=10)
        samples = (tokens - 1) // args.seq_length
        print(f"corpus: {format_count(n)} documents, {format_count(tokens)} tokens -> "
              f"{format_count(samples)} samples of {args.seq_length} (index arrays ~"
              f"{(4 * n + 20 * samples) / 2**20:.0f} MiB); written in {time.perf_counter() - t:.1f}s")
        print(f"{W} ranks, forked, gloo; each calls build_stage_data + reads one batch\n")
        results = {}
        for label, cache in (("BEFORE (cache_dir=None: every rank builds)", None),
                             ("AFTER (shared cache: one builds, others mmap)",
                              os.path.join(work, "cache"))):
            t = time.perf_counter()
            res = run(W, stage, 10, cache)
            wall = time.perf_counter() - t
            results[label] = res
            print(f"{label}: {wall:.1f}s wall")
            print("  rank  peak RSS MiB  peak anon MiB  anon held MiB  build s")
            for r, x in enumerate(res):
                print(f"  {r:4d}  {x['peak'] / 2**20:12.0f}  {x['peak_anon'] / 2**20:13.0f}  "
                      f"{x['anon'] / 2**20:13.0f}  {x['seconds']:7.1f}")
            print("   sum  " + "  ".join(f"{sum(x[k] for x in res) / 2**20:{w}.0f}" for k, w in
                                         (("peak", 12), ("peak_anon", 13), ("anon", 13))) + "\n")
        (_, b), (_, a) = results.items()

        def ratio(key, pick):
            return pick([x[key] for x in b]) / max(1, pick([x[key] for x in a]))

        others = lambda xs: max(xs[1:])  # noqa: E731 - the ranks that do not build in AFTER
        print("BEFORE / AFTER:")
        for key, name in (("peak", "peak RSS"), ("peak_anon", "peak anon"), ("anon", "anon held")):
            print(f"  {name:9s}: sum over ranks x{ratio(key, sum):.1f}, "
                  f"non-building rank x{ratio(key, others):.1f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
