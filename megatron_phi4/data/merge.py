"""Merge indexed datasets: ``tools/merge_datasets.py --input PREFIX... --output-prefix OUT``.

Inputs are concatenated in the order given (``--input`` entries may be globs of ``.idx``/``.bin``
files or prefixes; each glob is sorted) or, with ``--input-dir DIR``, all datasets in ``DIR``
sorted by name (optionally filtered by ``--pattern``, e.g. ``'*_text_document'``). All inputs must
have the same dtype. ``.bin`` bytes are copied as-is and the ``.idx`` rebuilt with bounded memory;
the output appears atomically. Merging the shard outputs of an array job in shard order gives the
same bytes as one unsharded run.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import sys
from typing import List, Optional, Sequence

from megatron_phi4.data.indexed import IndexedDatasetError, merge_indexed

__all__ = ["resolve_prefixes", "main"]


def _strip(p: str) -> str:
    for ext in (".idx", ".bin"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def resolve_prefixes(inputs: Sequence[str] = (), input_dir: Optional[str] = None,
                     pattern: Optional[str] = None) -> List[str]:
    prefixes: List[str] = []
    if input_dir:
        if not os.path.isdir(input_dir):
            raise IndexedDatasetError(f"--input-dir {input_dir} is not a directory")
        names = sorted(f[:-4] for f in os.listdir(input_dir) if f.endswith(".idx"))
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern)]
        prefixes += [os.path.join(input_dir, n) for n in names]
    for item in inputs:
        if glob.has_magic(item):
            found = sorted({_strip(p) for p in glob.glob(item) if p.endswith((".idx", ".bin"))})
            if not found:
                found = sorted({_strip(p) for p in glob.glob(item + ".idx")})
            if not found:
                raise IndexedDatasetError(f"--input {item} matched no datasets")
            prefixes += found
        else:
            prefixes.append(_strip(item))
    seen, out = set(), []
    for p in prefixes:
        if p in seen:
            print(f"[merge_datasets] note: {p} listed more than once; merged once",
                  file=sys.stderr)
            continue
        seen.add(p)
        out.append(p)
    if not out:
        raise IndexedDatasetError("no input datasets")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="merge_datasets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="*", default=[], help="dataset prefixes (or globs), in order")
    ap.add_argument("--input-dir", default=None, help="merge every dataset in this directory")
    ap.add_argument("--pattern", default=None, help="with --input-dir: fnmatch on prefix names")
    ap.add_argument("--output-prefix", required=True)
    args = ap.parse_args(argv)
    try:
        prefixes = resolve_prefixes(args.input, args.input_dir, args.pattern)
        info = merge_indexed(prefixes, args.output_prefix)
    except IndexedDatasetError as e:
        print(f"[merge_datasets] ERROR: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(f"[merge_datasets] merged {len(prefixes)} datasets -> {args.output_prefix}.bin/.idx: "
          f"{info.document_count - 1:,} documents, {info.sequence_count:,} sequences, "
          f"{info.num_tokens:,} elements of {info.dtype}", file=sys.stderr)


if __name__ == "__main__":
    main()
