"""Per-source token budget of a mixture: unique tokens, tokens contributed, epochs.

    python tools/mixture_report.py --mixture examples/mixtures/phi4_pretrain.yaml --train-tokens 10T \
        --unique-tokens web=1.3T,web_rewrites=290B,synthetic=290B,code=820B,books=580B

Unique tokens come from the sources' ``.idx`` files (sum of the lengths of the documents that
pass the source's ``min_document_tokens`` filter) unless given with ``--unique-tokens``.
Tokens contributed = normalized weight x train tokens; epochs = contributed / unique.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_phi4.data.mixture import MixtureError, MixtureSpec

__all__ = ["SourceBudget", "mixture_budget", "source_unique_tokens", "parse_count",
           "format_count", "format_report", "main"]

_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(value, name: str = "value") -> int:
    """'10T' -> 10**13, '290B' -> 2.9e11, '5760' -> 5760."""
    s = str(value).strip().upper()
    mult = 1
    if s and s[-1] in _SUFFIX:
        mult, s = _SUFFIX[s[-1]], s[:-1]
    try:
        return int(round(float(s) * mult))
    except ValueError:
        raise ValueError(f"{name}: cannot read {value!r} as a count (examples: 5760, 250B, 10T)") \
            from None


def format_count(n: float) -> str:
    for suf, m in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= m:
            return f"{n / m:.3g}{suf}"
    return f"{n:.0f}"


@dataclass
class SourceBudget:
    name: str
    weight: float            # normalized share of training tokens
    unique_tokens: int
    contributed_tokens: float
    epochs: float
    from_index: bool         # unique tokens read from .idx files (False: given)


def source_unique_tokens(prefixes: Sequence[str], min_document_tokens: int = 0) -> int:
    from megatron_phi4.data.indexed import read_index
    tot = 0
    for p in prefixes:
        lens = read_index(p, validate=False).sequence_lengths
        for a in range(0, len(lens), 1 << 22):
            c = np.asarray(lens[a:a + (1 << 22)])
            if min_document_tokens > 0:
                c = c[c > min_document_tokens]
            tot += int(c.sum(dtype=np.int64))
    return tot


def mixture_budget(spec: MixtureSpec, train_tokens: int,
                   unique_tokens: Optional[Dict[str, int]] = None) -> List[SourceBudget]:
    unique_tokens = dict(unique_tokens or {})
    unknown = set(unique_tokens) - set(spec.names)
    if unknown:
        raise MixtureError(f"--unique-tokens: no source named {sorted(unknown)[0]!r} in "
                           f"{spec.file or 'the mixture'} (sources: {', '.join(spec.names)})")
    out = []
    for src, w in zip(spec.sources, spec.normalized_weights()):
        if src.name in unique_tokens:
            u, from_idx = int(unique_tokens[src.name]), False
        else:
            u, from_idx = source_unique_tokens(src.prefixes, src.min_document_tokens), True
        contrib = w * train_tokens
        out.append(SourceBudget(src.name, w, u, contrib, contrib / u if u else float("inf"),
                                from_idx))
    return out


def format_report(rows: List[SourceBudget], train_tokens: int) -> str:
    lines = [f"train tokens: {format_count(train_tokens)}",
             f"{'source':<20} {'weight':>7} {'unique':>9} {'contributed':>12} {'epochs':>7}"]
    for r in rows:
        mark = "" if r.from_index else "*"
        lines.append(f"{r.name:<20} {r.weight:>7.3f} {format_count(r.unique_tokens) + mark:>9} "
                     f"{format_count(r.contributed_tokens):>12} {r.epochs:>7.1f}")
    if any(not r.from_index for r in rows):
        lines.append("* unique tokens given on the command line")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mixture", required=True, help="YAML mixture spec")
    ap.add_argument("--train-tokens", required=True, help="training token budget, e.g. 10T")
    ap.add_argument("--unique-tokens", default="",
                    help="name=COUNT,... overriding the counts read from the .idx files")
    args = ap.parse_args(argv)
    try:
        given = {}
        for item in filter(None, (x.strip() for x in args.unique_tokens.split(","))):
            if "=" not in item:
                raise MixtureError(f"--unique-tokens: expected name=COUNT, got {item!r}")
            k, v = item.split("=", 1)
            given[k.strip()] = parse_count(v, f"--unique-tokens {k}")
        spec = MixtureSpec.from_yaml(args.mixture, check_paths=False)
        train = parse_count(args.train_tokens, "--train-tokens")
        rows = mixture_budget(spec, train, given)
    except (MixtureError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(rows, train))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
