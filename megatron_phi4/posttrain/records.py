"""What the post-training data tools share: JSONL records located by ``file:line``, a report that
gives every input record a fate, token ids from text or from the record, and atomic outputs.

The tools (judge-guided pairs, refusal data) are one cheap pass over JSONL with no model in the
loop, so "resumable" means: outputs appear only when complete (written to a temporary file in the
same directory, fsynced, renamed), and a rerun starts over. By default the first bad record stops
the run with ``file:line: field: reason`` and leaves any earlier output untouched; with
``skip_invalid`` bad records are skipped, and each is counted and listed in the report. Either
way no record is dropped without a count.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

from megatron_phi4.fileio import atomic_write_json, fsync_dir

__all__ = ["RecordError", "iter_jsonl", "run_records", "FateReport", "AtomicJsonlWriter", "write_json_atomic",
           "LazyTokenizer", "token_ids", "prompt_messages", "prompt_ids_of", "response_ids_of",
           "MAX_LISTED_ERRORS"]

VOCAB_SIZE = 100352
MAX_LISTED_ERRORS = 1000  # the report lists this many invalid records' messages; all are counted


class RecordError(ValueError):
    """An input record is invalid; the message starts with ``file:line`` and names the field."""


def iter_jsonl(paths: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """``(where, obj)`` for every non-blank line; ``obj`` is a :class:`RecordError` when the line
    is not JSON (so a skipping caller can count it like any other bad record)."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such input file")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, RecordError(f"{where}: invalid JSON: {e.msg} (column {e.colno})")


class FateReport:
    """Counts every input record's fate (exactly one per record) and every output produced."""

    def __init__(self, tool: str):
        self.tool = tool
        self.records = 0
        self.fates: Counter = Counter()
        self.outputs: Counter = Counter()
        self.invalid: list[str] = []

    def fate(self, name: str) -> None:
        self.records += 1
        self.fates[name] += 1

    def bad(self, message: str) -> None:
        self.fate("invalid")
        if len(self.invalid) < MAX_LISTED_ERRORS:
            self.invalid.append(message)

    def to_dict(self, **extra) -> dict:
        assert sum(self.fates.values()) == self.records
        out = {"tool": self.tool, "records": self.records, "fates": dict(sorted(self.fates.items())),
               "outputs": dict(sorted(self.outputs.items())), "invalid": self.invalid}
        if self.fates["invalid"] > len(self.invalid):
            out["invalid_not_listed"] = self.fates["invalid"] - len(self.invalid)
        out.update(extra)
        return out

    def summary(self) -> str:
        fates = ", ".join(f"{k} {v}" for k, v in sorted(self.fates.items()))
        outs = ", ".join(f"{k} {v}" for k, v in sorted(self.outputs.items()))
        return f"[{self.tool}] {self.records} records ({fates}); outputs: {outs or 'none'}"


def run_records(paths, report: FateReport, handle: Callable[[str, Any], str], skip_invalid: bool,
                progress_every: int = 100_000) -> None:
    """Call ``handle(where, obj) -> fate`` for every record; a :class:`RecordError` stops the run
    (re-raised) or, with ``skip_invalid``, is counted as the record's fate."""
    for where, obj in iter_jsonl(paths):
        try:
            if isinstance(obj, RecordError):
                raise obj
            report.fate(handle(where, obj))
        except RecordError as e:
            if not skip_invalid:
                raise
            report.bad(str(e))
        if progress_every and report.records % progress_every == 0:
            print(report.summary(), file=sys.stderr, flush=True)


class AtomicJsonlWriter:
    """JSONL written to ``PATH.tmp-<pid>`` and renamed over ``PATH`` by :meth:`commit`; an exception
    inside ``with`` removes the temporary file and leaves ``PATH`` as it was."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        self.count = 0
        self._f = None

    def __enter__(self) -> "AtomicJsonlWriter":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._f = open(self.tmp, "w", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.count += 1

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (``fileio.atomic_write_json``)."""
    atomic_write_json(path, obj)


# --------------------------------------------------------------------------- token ids
class LazyTokenizer:
    """The Phi-4 tokenizer, built on first use (records that carry token ids never need it)."""

    def __init__(self, tokenizer=None):
        self._tok = tokenizer

    def __call__(self):
        if self._tok is None:
            from megatron_phi4.tokenizer import get_tokenizer
            self._tok = get_tokenizer()
        return self._tok


def token_ids(value, where: str, field: str, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """Validate a non-empty list of token ids in ``[0, vocab_size)``."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: {field}: expected a non-empty list of token ids, got "
                          f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    for j, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < vocab_size:
            raise RecordError(f"{where}: {field}[{j}]: expected a token id in [0, {vocab_size}), got {x!r}")
    return value


def _text(obj: dict, key: str, where: str, field: str | None = None) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise RecordError(f"{where}: {field or key}: expected a non-empty string, got {v!r}")
    return v


def prompt_messages(obj: dict, where: str) -> list[dict]:
    """The chat messages a prompt stands for: ``messages`` (ending with a user turn), or
    ``prompt`` / ``question`` text as one user turn after an optional ``system`` text."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RecordError(f"{where}: messages: expected a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise RecordError(f"{where}: messages[{i}]: expected {{role: system|user|assistant, "
                                  f"content: string}}, got {m!r}")
        if msgs[-1]["role"] != "user":
            raise RecordError(f"{where}: messages: the last message must be the user turn being answered, "
                              f"got role {msgs[-1]['role']!r}")
        return msgs
    key = next((k for k in ("prompt", "question") if k in obj), None)
    if key is None:
        raise RecordError(f"{where}: prompt: missing (give prompt_ids, messages, or prompt / question text)")
    msgs = [{"role": "user", "content": _text(obj, key, where)}]
    if obj.get("system") is not None:
        msgs.insert(0, {"role": "system", "content": _text(obj, "system", where)})
    return msgs


def prompt_ids_of(obj: dict, where: str, tokenizer: LazyTokenizer) -> list[int]:
    """``prompt_ids`` as given, else the chat-formatted prompt with the assistant generation header."""
    if "prompt_ids" in obj:
        return token_ids(obj["prompt_ids"], where, "prompt_ids")
    return tokenizer().apply_chat_template(prompt_messages(obj, where), add_generation_prompt=True)


def response_ids_of(text: str, tokenizer: LazyTokenizer) -> list[int]:
    """A response as the model emits it: the text's tokens, then ``<|im_end|>``."""
    tok = tokenizer()
    return tok.encode(text) + [tok.im_end_id]
