"""Tokenize JSONL text into Megatron indexed datasets (``PREFIX_<key>_document.bin/.idx``).

Command-line compatible with Megatron-LM's ``tools/preprocess_data.py`` for the options that matter
(``--input --output-prefix --json-keys --workers --append-eod --log-interval``), plus
``--strict``, ``--shard-index/--num-shards`` (defaults from SLURM array variables),
``--chunk-mb``, ``--keep-parts``. See ``docs/data_preprocessing.md`` and
:mod:`megatron_phi4.data._preprocess_core` for the design (parallel partial files, atomic merge,
resumable runs).

Example::

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/web \\
        --json-keys text --append-eod --workers 16

Each non-blank line must be a JSON object whose every ``--json-keys`` value is a non-empty
string (not only whitespace). Anything else is skipped as a whole line with a reason
(``invalid_utf8``, ``bad_json``, ``not_object``, ``missing_key``, ``not_string``,
``empty_document``) and reported as ``file:line``; ``--strict`` turns the first one into an error.
A run in which every line was skipped (e.g. a wrong ``--json-keys``) exits non-zero with the
counts and the keys the lines had, and writes no output. Special-token strings inside the text (e.g. a literal ``<|endoftext|>``) are tokenized as plain
text; only ``--append-eod`` adds the real ``<|endoftext|>`` (100257).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_phi4.data._preprocess_core import (
    BadRecord,
    Processor,
    RunResult,
    cli_main,
    run,
)
from megatron_phi4.tokenizer import Phi4Tokenizer

__all__ = ["TextProcessor", "preprocess", "main"]


class TextProcessor(Processor):
    """One output per JSON key: the key's text tokenized (+ ``<|endoftext|>`` with append_eod)."""

    name = "text"

    def __init__(self, tokenizer: Phi4Tokenizer, json_keys: Sequence[str] = ("text",),
                 append_eod: bool = False) -> None:
        if not json_keys:
            raise ValueError("at least one json key is needed")
        if len(set(json_keys)) != len(json_keys):
            raise ValueError(f"duplicate json keys: {list(json_keys)}")
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.required_keys, self.keys_option = self.json_keys, "--json-keys"
        self.append_eod = bool(append_eod)
        self.outputs = [(f"{k}_document", np.int32) for k in self.json_keys]
        enc = tokenizer.encoding
        # encode_to_numpy with no special tokens allowed and none disallowed is encode_ordinary
        # (special-token strings become plain text) without building a Python list.
        self._encode = lambda text: enc.encode_to_numpy(
            text, allowed_special=set(), disallowed_special=())
        self._eod = np.array([tokenizer.eod_id], dtype=np.uint32)

    def fingerprint(self) -> Dict[str, Any]:
        return {"kind": "text", "keys": self.json_keys, "append_eod": self.append_eod,
                "tokenizer": getattr(self.tokenizer, "bpe_sha256", "cl100k"),
                "vocab": self.tokenizer.vocab_size}

    def extract(self, obj: Any) -> Tuple[str, ...]:
        if not isinstance(obj, dict):
            raise BadRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
        vals = []
        for k in self.json_keys:
            if k not in obj:
                raise BadRecord("missing_key", f"key {k!r} not found")
            v = obj[k]
            if not isinstance(v, str):
                raise BadRecord("not_string", f"key {k!r} is {type(v).__name__}, not a string")
            if not v or v.isspace():
                raise BadRecord("empty_document", f"key {k!r} is empty")
            vals.append(v)
        return tuple(vals)

    def encode(self, items: List[Tuple[str, ...]], pool: Optional[ThreadPoolExecutor]
               ) -> List[Tuple[np.ndarray, np.ndarray]]:
        outs = []
        for k in range(len(self.json_keys)):
            texts = [it[k] for it in items]
            if pool is not None and len(texts) > 1:
                arrays = list(pool.map(self._encode, texts))
            else:
                arrays = [self._encode(t) for t in texts]
            lens = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
            if self.append_eod:
                parts = []
                for a in arrays:
                    parts.append(a)
                    parts.append(self._eod)
                lens += 1
            else:
                parts = arrays
            flat = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
            # Token ids are < 2**31, so the uint32 bytes are the int32 bytes.
            outs.append((flat.view(np.int32), lens))
        return outs


def preprocess(inputs: Sequence[str], output_prefix: str, json_keys: Sequence[str] = ("text",),
               append_eod: bool = False, workers: int = 1,
               tokenizer: Optional[Phi4Tokenizer] = None, **kwargs) -> RunResult:
    """Library entry point (same semantics as the command line). See :func:`_preprocess_core.run`
    for ``kwargs`` (``strict``, ``shard_index``, ``num_shards``, ``chunk_mb``, ``quiet`` ...)."""
    tok = tokenizer or Phi4Tokenizer()
    return run(TextProcessor(tok, json_keys, append_eod), inputs, output_prefix,
               workers=workers, **kwargs)


def _build(p):
    g = p.add_argument_group("text")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys to tokenize; one output dataset per key")
    g.add_argument("--append-eod", action="store_true",
                   help="append <|endoftext|> (100257) after every document")
    g.add_argument("--split-sentences", action="store_true", help="not supported")
    g.add_argument("--keep-newlines", action="store_true", help="ignored (newlines are kept)")

    def make(args):
        if args.split_sentences:
            from megatron_phi4.data._preprocess_core import PreprocessError
            raise PreprocessError("--split-sentences is not supported")
        tok = Phi4Tokenizer(bpe_path=args.tokenizer_model)
        return TextProcessor(tok, args.json_keys, args.append_eod)

    return make


def main(argv: Optional[Sequence[str]] = None) -> None:
    raise SystemExit(cli_main(_build, argv, "preprocess_data",
                              "Tokenize JSONL text into Megatron .bin/.idx datasets "
                              "(Phi-4 tokenizer)."))


if __name__ == "__main__":
    main()
