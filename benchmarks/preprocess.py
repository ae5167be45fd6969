#!/usr/bin/env python
"""Preprocessing throughput: our end-to-end tool vs raw tiktoken on the same texts.

Builds a JSONL corpus (default 150 MB; ``--mb 20`` for a quick run) from text already on the
machine (/usr/share/doc, /usr/share/man pages (gz), Python stdlib sources under sys.prefix/lib),
then measures

(a) raw tiktoken: ``encode_ordinary_batch(texts, num_threads=W)`` over all texts (already in
    memory, JSON parsing excluded), with the Phi-4 encoding;
(b) ``tools/preprocess_data.py --workers W`` end to end (process start, reading, JSON, tokenizing,
    writing partial files, merge), without ``--append-eod`` so both count the same tokens.

and prints tokens/s for both and the ratio (target: >= 0.90).

    python benchmarks/preprocess.py --mb 50 --workers 2
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_phi4.tokenizer import Phi4Tokenizer  # noqa: E402



def _sources():
    lib = os.path.join(sys.prefix, "lib")
    roots = [("/usr/share/doc", None), ("/usr/share/man", ".gz"), (lib, ".py")]
    for root, ext in roots:
        if not os.path.isdir(root):
            continue
        for dp, dns, fns in os.walk(root):
            dns.sort()
            for fn in sorted(fns):
                if ext and not fn.endswith(ext):
                    continue
                yield os.path.join(dp, fn)


def _read_text(path):
    try:
        if os.path.islink(path) or os.path.getsize(path) > 8 << 20:
            return None
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read(16 << 20)
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not raw or b"\x00" in raw[:4096]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build_corpus(out_dir: str, mb: float, n_files: int = 8, doc_max: int = 64 << 10) -> tuple:
    """Write ``n_files`` JSONL files totalling ~``mb`` MB; returns (files, n_docs, n_bytes)."""
    os.makedirs(out_dir, exist_ok=True)
    target = int(mb * 1e6)
    per_file = target // n_files + 1
    paths = [os.path.join(out_dir, f"corpus_{i:02d}.jsonl") for i in range(n_files)]
    fhs = [open(p, "w", encoding="utf-8") for p in paths]
    total = docs = 0
    cur = 0
    try:
        while total < target:
            added = False
            for src in _sources():
                text = _read_text(src)
                if not text or not text.strip():
                    continue
                for s in range(0, len(text), doc_max):
                    piece = text[s:s + doc_max]
                    if not piece.strip():
                        continue
                    line = json.dumps({"text": piece, "src": src}, ensure_ascii=False) + "\n"
                    fhs[cur].write(line)
                    n = len(line.encode("utf-8"))
                    total += n
                    docs += 1
                    added = True
                    if fhs[cur].tell() >= per_file and cur < n_files - 1:
                        cur += 1
                    if total >= target:
                        break
                if total >= target:
                    break
            if not added:
                raise SystemExit("no readable text found on this machine")
    finally:
        for f in fhs:
            f.close()
    return paths, docs, total


def load_texts(paths):
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
    return texts


def bench_raw(tok: Phi4Tokenizer, texts, threads: int, batch: int = 2048) -> tuple:
    """(tokens, wall seconds, cpu seconds) of encode_ordinary_batch over all texts."""
    enc = tok.encoding
    n = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        out = enc.encode_ordinary_batch(texts[i:i + batch], num_threads=threads)
        n += sum(len(x) for x in out)
    return n, time.perf_counter() - t0, time.process_time() - c0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench_tool(paths, out_prefix: str, workers: int, extra=()) -> tuple:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", *paths,
           "--output-prefix", out_prefix, "--workers", str(workers), "--log-seconds", "0",
           "--log-interval", "0", *extra]
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    cpu = _children_cpu() - c0
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"preprocess failed ({proc.returncode})")
    from megatron_phi4.data.indexed import read_index
    info = read_index(out_prefix + "_text_document.idx")
    return info.num_tokens, info.sequence_count, dt, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=150.0, help="corpus size in MB (default 150)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--doc-kb", type=int, default=64,
                    help="split source files into documents of at most this many KiB")
    ap.add_argument("--workdir", default="/tmp/phi4_preprocess_bench")
    ap.add_argument("--repeat", type=int, default=2,
                    help="alternate (a) and (b) this many times; report the best of each "
                         "(the machine may be shared)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    ap.add_argument("--reuse-corpus", action="store_true",
                    help="reuse an existing corpus in --workdir if its size matches")
    args = ap.parse_args(argv)

    corpus_dir = os.path.join(args.workdir, "corpus")
    stamp = os.path.join(corpus_dir, "STAMP")
    key = f"{args.mb}/{args.doc_kb}"
    if args.reuse_corpus and os.path.exists(stamp) and open(stamp).read() == key:
        paths = sorted(os.path.join(corpus_dir, f) for f in os.listdir(corpus_dir)
                       if f.endswith(".jsonl"))
        nbytes = sum(os.path.getsize(p) for p in paths)
        ndocs = None
    else:
        shutil.rmtree(corpus_dir, ignore_errors=True)
        t0 = time.perf_counter()
        paths, ndocs, nbytes = build_corpus(corpus_dir, args.mb, doc_max=args.doc_kb << 10)
        open(stamp, "w").write(key)
        print(f"corpus: {len(paths)} files, {ndocs:,} docs, {nbytes / 1e6:.1f} MB "
              f"(built in {time.perf_counter() - t0:.1f}s)")

    tok = Phi4Tokenizer()
    texts = load_texts(paths)
    out = os.path.join(args.workdir, "out", "bench")
    raw_runs, tool_runs = [], []
    for rep in range(args.repeat):
        n_raw, t_raw, c_raw = bench_raw(tok, texts, args.workers)
        raw_runs.append((t_raw, c_raw))
        n_tool, n_docs, t_tool, c_tool = bench_tool(paths, out, args.workers)
        tool_runs.append((t_tool, c_tool))
        print(f"  run {rep}: raw {t_raw:.2f}s wall / {c_raw:.2f}s cpu; "
              f"tool {t_tool:.2f}s wall / {c_tool:.2f}s cpu", flush=True)
    del texts
    if n_tool != n_raw:
        print(f"WARNING: token counts differ: tool {n_tool:,} vs raw {n_raw:,}", file=sys.stderr)
    t_raw, c_raw = min(r[0] for r in raw_runs), min(r[1] for r in raw_runs)
    t_tool, c_tool = min(r[0] for r in tool_runs), min(r[1] for r in tool_runs)
    raw_tps, tool_tps = n_raw / t_raw, n_tool / t_tool
    print(f"input: {nbytes / 1e6:.1f} MB, {n_docs:,} documents, {n_raw:,} tokens; "
          f"workers/threads = {args.workers}, cpus = {os.cpu_count()}, best of {args.repeat}")
    print(f"(a) raw tiktoken encode_ordinary_batch(num_threads={args.workers}): "
          f"{t_raw:7.2f} s  {raw_tps / 1e6:6.3f} M tok/s  {nbytes / t_raw / 1e6:6.2f} MB/s  "
          f"(cpu {c_raw:.2f} s)")
    print(f"(b) tools/preprocess_data.py --workers {args.workers} (end to end):  "
          f"{t_tool:7.2f} s  {tool_tps / 1e6:6.3f} M tok/s  {nbytes / t_tool / 1e6:6.2f} MB/s  "
          f"(cpu {c_tool:.2f} s)")
    print(f"ratio (b)/(a) tokens/s = {tool_tps / raw_tps:.3f}  (target >= 0.90); "
          f"cpu-time ratio (a)/(b) = {c_raw / c_tool:.3f}")
    if not args.keep:
        shutil.rmtree(os.path.join(args.workdir, "out"), ignore_errors=True)
        shutil.rmtree(corpus_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
