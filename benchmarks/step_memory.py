"""Peak memory and time of one training step against sequence length, before and after the O(S) work.

One training step = ``ParallelEngine.forward_backward`` (micro-batch 1) + AdamW step of a tiny model
(hidden 64, 2 layers, 4/2 heads, FFN 128) with the real 100352-token vocabulary (``--vocab``), on
CPU, at sequence 2K, 4K, 8K and 16K, for

* ``unpacked`` rows: one document per row, ``document_ids`` all zero, as the SFT / DPO / pre-training
  collates give (the sampler fills zeros when the samples carry none);
* ``packed`` rows: documents of 256..1791 tokens (seeded), positions restarting at each.

``before`` is this project's path before the O(S) work, reimplemented faithfully here through the
layer-backend seam: core attention builds the dense boolean [B, 1, S, S] document-causal mask
whenever ``document_ids`` are given (the old ``SDPAttention``), and the loss takes the whole logits
(the old ``token_log_probs``: an fp32 ``log_softmax`` of all of them). ``after`` is the library as it
is: plain causal SDPA for one-document rows, per-document SDPA for packed rows, and the LM head fused
into a chunked log-softmax (``model.logits_chunk_tokens``, 1024).

Memory method: every configuration runs in a fresh subprocess (so high-water marks do not carry
over) with glibc's default malloc (large blocks are mmap-ed and returned when freed, so resident
memory follows live memory; the training entry point's malloc tuning is not applied). Reported: the
process's peak resident set (``ru_maxrss``) and the step's share of it (peak minus the resident set
just before the first step, which already holds the model, the data and the imported libraries).
``--steps`` steps run (default 2: the second is a steady-state step -- AdamW's state exists during
its forward and backward, as in training, and adds 8 bytes per parameter to its peak; the first
step's backward runs before that state is allocated); the time is the last step's. A configuration whose address space would exceed
``--mem-cap-gb`` (RLIMIT_AS) stops with MemoryError and is reported as such, not estimated.

    python benchmarks/step_memory.py                  # the whole table (a few minutes on 2 cores)
    python benchmarks/step_memory.py --seqs 2048,4096 --paths after
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- one configuration
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batch(seq: int, vocab: int, packed: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq + 1), generator=g)
    doc = torch.zeros(1, seq, dtype=torch.long)
    pos = torch.arange(seq).unsqueeze(0).clone()
    if packed:
        start, d = 0, 0
        while start < seq:
            n = min(int(torch.randint(256, 1792, (1,), generator=g)), seq - start)
            doc[0, start:start + n], pos[0, start:start + n] = d, torch.arange(n)
            start, d = start + n, d + 1
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "loss_mask": torch.ones(1, seq), "position_ids": pos, "document_ids": doc}


def _register_before_backend() -> None:
    """The attention of the ``before`` path: the old SDPAttention (dense mask for any document_ids)."""
    import torch.nn.functional as F
    from torch import nn

    from megatron_phi4 import registry
    from megatron_phi4.layers.attention import SDPAttention, document_causal_mask
    from megatron_phi4.layers.local import LocalBackend

    class DenseMaskAttention(SDPAttention):
        def forward(self, q, k, v, meta):
            batch, seq = q.shape[:2]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            ids = meta.document_ids
            mask = meta.cached("dense_mask", lambda: None if ids is None else document_causal_mask(ids))
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            return out.transpose(1, 2).reshape(batch, seq, -1)

    class DenseMaskBackend(LocalBackend):
        name = "bench_dense_mask"

        def core_attention(self, num_heads, num_kv_heads, head_dim) -> nn.Module:
            return DenseMaskAttention(num_heads, num_kv_heads, head_dim, self.ctx)

    registry.BACKENDS.register(DenseMaskBackend.name, DenseMaskBackend, override=True)


def run_one(seq: int, packed: bool, path: str, vocab: int, steps: int) -> dict:
    import torch

    from megatron_phi4.config import ParallelConfig, model_preset
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    class WholeLogitsLM(LMLoss):  # the old loss input: the whole logits, fp32 log_softmax of all of them
        inputs = "logits"

    backend = "local"
    if path == "before":
        _register_before_backend()
        backend = "bench_dense_mask"
    cfg = model_preset("tiny", vocab_size=vocab, max_seq_length=seq, backend=backend)
    engine = ParallelEngine(cfg, ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1), seed=0)
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-4)
    loss_fn = WholeLogitsLM() if path == "before" else LMLoss()
    mbs = [_batch(seq, vocab, packed)]
    units = engine.global_units(mbs, loss_fn)
    rss_before = _rss_mib()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.append(engine.forward_backward(mbs, loss_fn, units)["loss"])
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rss_before_mib": rss_before, "peak_mib": peak, "step_s": times[-1], "loss": losses[0]}


# --------------------------------------------------------------------------- the table
def _spawn(seq, packed, path, vocab, steps, cap_gb, timeout) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--seqs", str(seq), "--paths", path, "--vocab", str(vocab),
           "--batches", "packed" if packed else "unpacked", "--steps", str(steps)]
    cap = int(cap_gb * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": "MemoryError (over the cap)" if "MemoryError" in res.stderr or "alloc" in tail.lower()
                else tail[:100]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="2048,4096,8192,16384")
    p.add_argument("--batches", default="unpacked,packed")
    p.add_argument("--paths", default="before,after")
    p.add_argument("--vocab", type=int, default=100352)
    p.add_argument("--steps", type=int, default=2, help="training steps per configuration (time: the last)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0, help="address-space cap per configuration")
    p.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")]
    batches, paths = args.batches.split(","), args.paths.split(",")
    if args.worker:
        print(json.dumps(run_one(seqs[0], batches[0] == "packed", paths[0], args.vocab, args.steps)))
        return 0

    print(f"one training step (forward, backward, AdamW), tiny model (hidden 64, 2 layers), vocab {args.vocab}, "
          f"micro-batch 1, CPU; fresh process per row, address space capped at {args.mem_cap_gb:g} GiB")
    print(f"{'batch':<9} {'path':<7} {'seq':>6} {'peak RSS MiB':>13} {'step share MiB':>15} {'step s':>8}")
    results: dict = {}
    start = time.time()
    for batch in batches:
        for path in paths:
            for seq in seqs:
                r = _spawn(seq, batch == "packed", path, args.vocab, args.steps, args.mem_cap_gb, args.timeout)
                results[(batch, path, seq)] = r
                if "error" in r:
                    print(f"{batch:<9} {path:<7} {seq:>6} {'-':>13} {'-':>15} {'-':>8}  {r['error']}", flush=True)
                else:
                    share = r["peak_mib"] - r["rss_before_mib"]
                    print(f"{batch:<9} {path:<7} {seq:>6} {r['peak_mib']:>13.0f} {share:>15.0f} {r['step_s']:>8.2f}",
                          flush=True)
    print("\ngrowth of the step's memory share per doubling of the sequence (quadratic -> 4, linear -> 2, "
          "lower where a constant part dominates), over the whole range, and after/before at each length")
    for batch in batches:
        for path in paths:
            ok = [(s, results[(batch, path, s)]) for s in seqs if "error" not in results[(batch, path, s)]]
            ratios = [f"{b[1]['peak_mib'] - b[1]['rss_before_mib']:.0f}/{a[1]['peak_mib'] - a[1]['rss_before_mib']:.0f}"
                      f"={(b[1]['peak_mib'] - b[1]['rss_before_mib']) / max(a[1]['peak_mib'] - a[1]['rss_before_mib'], 1):.2f}"
                      for a, b in zip(ok, ok[1:]) if b[0] == 2 * a[0]]
            whole = ""
            if len(ok) >= 2:
                (s0, r0), (s1, r1) = ok[0], ok[-1]
                share0, share1 = r0["peak_mib"] - r0["rss_before_mib"], r1["peak_mib"] - r1["rss_before_mib"]
                whole = f"   {s0}->{s1} ({s1 / s0:g}x longer): {share1 / max(share0, 1):.2f}x"
            print(f"  {batch:<9} {path:<7} " + ("  ".join(ratios) or "(fewer than two lengths measured)") + whole)
        if {"before", "after"} <= set(paths):
            cmp = []
            for s in seqs:
                b, a = results[(batch, "before", s)], results[(batch, "after", s)]
                if "error" not in a and "error" not in b:
                    cmp.append(f"{s}: {a['peak_mib'] / b['peak_mib']:.3f}x memory, {a['step_s'] / b['step_s']:.2f}x time")
            print(f"  {batch:<9} after/before peak RSS: " + ("; ".join(cmp) or "no length measured on both paths"))
    print(f"\ntotal {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
