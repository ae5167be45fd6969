#!/usr/bin/env python
"""Time the pre-training index builders on a synthetic corpus description.

No token data is written: a ``sequence_lengths`` array for ``--docs`` documents (log-normal
lengths, mean ~``--mean-tokens``) is synthesized in memory and handed to the builders, exactly as
``GPTDataset`` hands them the ``.idx`` lengths. Phases: long-document filter selection, document
index (per-epoch shuffle), sample index, shuffle index, blending index over the Phi-4 source
weights for the same number of samples. Reports wall time per phase, the peak of traced numpy
allocations (tracemalloc) per phase, bytes per document, and the process's max RSS.

    python benchmarks/index_build.py                 # 100M documents (~90B tokens)
    python benchmarks/index_build.py --docs 1M       # quick
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_phi4.data.blending import build_blending_indices  # noqa: E402
from megatron_phi4.data.gpt_dataset import (  # noqa: E402
    build_document_index, build_sample_index, build_shuffle_index, num_epochs_for,
    select_documents, tokens_in)
from megatron_phi4.data.mixture_report import format_count, parse_count  # noqa: E402


def synth_lengths(n: int, mean: float, seed: int = 0) -> np.ndarray:
    """Log-normal document lengths (sigma 1.2), scaled to ``mean``, at least 1 token; int32."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, np.int32)
    sigma = 1.2
    mu = np.log(mean) - sigma ** 2 / 2
    step = 1 << 24
    for a in range(0, n, step):
        m = min(step, n - a)
        out[a:a + m] = np.clip(rng.lognormal(mu, sigma, m), 1, 2**31 - 1).astype(np.int32)
    return out


class Phase:
    def __init__(self, name, rows):
        self.name, self.rows = name, rows

    def __enter__(self):
        tracemalloc.reset_peak()
        self.base = tracemalloc.get_traced_memory()[0]
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t
        peak = tracemalloc.get_traced_memory()[1] - self.base
        self.rows.append((self.name, dt, peak))
        print(f"  {self.name:<34} {dt:8.2f} s   peak +{peak / 2**30:6.2f} GiB", flush=True)


def run(n_docs: int, mean: float, seq_length: int, min_doc: int, seed: int) -> None:
    rows = []
    print(f"documents {format_count(n_docs)}, mean length ~{mean:.0f}, seq_length {seq_length}, "
          f"min_document_tokens {min_doc}")
    tracemalloc.start()
    t0 = time.perf_counter()
    lengths = synth_lengths(n_docs, mean, seed)
    total_tokens = int(lengths.sum(dtype=np.int64))
    print(f"  synthesized lengths in {time.perf_counter() - t0:.1f} s: "
          f"{format_count(total_tokens)} tokens")
    base_mem = tracemalloc.get_traced_memory()[0]
    t_all = time.perf_counter()
    with Phase("select documents (filter)", rows):
        docs = select_documents(lengths, min_doc)
        tpe = tokens_in(lengths, docs)
    num_samples = (tpe - 1) // seq_length  # one epoch
    epochs = num_epochs_for(tpe, seq_length, num_samples)
    with Phase(f"document index ({epochs} epoch)", rows):
        di = build_document_index(docs, epochs, seed)
    del docs
    with Phase(f"sample index ({format_count(num_samples)} samples)", rows):
        si = build_sample_index(lengths, di, seq_length, num_samples)
    with Phase("shuffle index", rows):
        sh = build_shuffle_index(num_samples, num_samples, seed)
    t_gpt = time.perf_counter() - t_all
    with Phase(f"blending index ({format_count(num_samples)}, 5 src)", rows):
        bi = build_blending_indices([0.15, 0.15, 0.40, 0.20, 0.10], num_samples)
    t_total = time.perf_counter() - t_all
    kept = len(di) // epochs
    held = di.nbytes + si.nbytes + sh.nbytes
    peak_phase = max(p for _, _, p in rows)
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"  GPT indices (filter+doc+sample+shuffle): {t_gpt:.1f} s; with blending {t_total:.1f} s")
    print(f"  documents kept {format_count(kept)}; index arrays held {held / 2**30:.2f} GiB "
          f"({held / max(kept, 1):.1f} B/doc) + blending {(bi[0].nbytes + bi[1].nbytes) / 2**30:.2f} GiB")
    print(f"  lengths array {lengths.nbytes / 2**30:.2f} GiB; largest per-phase peak "
          f"+{peak_phase / 2**30:.2f} GiB ({peak_phase / max(kept, 1):.1f} B/doc); "
          f"traced at start {base_mem / 2**30:.2f} GiB; max RSS {rss:.2f} GiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", default="100M", help="number of documents (100M, 1M, 50000...)")
    ap.add_argument("--mean-tokens", type=float, default=900.0)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--min-document-tokens", type=int, default=0,
                    help="long-document filter (mid-training: 8192 with --seq-length 16384)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    run(parse_count(args.docs, "--docs"), args.mean_tokens, args.seq_length,
        args.min_document_tokens, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
