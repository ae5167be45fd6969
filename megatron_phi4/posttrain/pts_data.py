"""Files of the Pivotal Token Search tool: the questions it reads, the token codec, the journal that
makes it resumable, and the exported records and DPO pairs.

Questions (JSONL, one object per line)::

    {"id": "gsm8k-17",                       # optional, unique (default: "line-N")
     "prompt_ids": [100264, 882, ...],       # the query as token ids of the model, generation prompt
                                             # included ...
     "messages": [{"role": "user", "content": "..."}],   # ... or as chat messages (exactly one of
                                             # the two); encoded with the generation prompt
     "reference": "42"}                      # what the oracle checks a response against (an answer,
                                             # a choice letter, test code)

Token ids are the model's throughout: for a trimmed-vocabulary model the question's ``prompt_ids``
and every id written are trimmed ids; the codec maps them to text only for the oracle.

Output directory::

    run.json                   the settings of the run (a resumed run must use the same ones)
    journal.rank<R>.jsonl      one line per finished question, appended by data-parallel rank R: the
                               commit point (a killed run loses at most the question in flight)
    pivotal_tokens.jsonl       one record per pivotal token            } exported from the journals,
    pairs.jsonl                one DPO pair per verified pivotal token  } rewritten atomically,
    summary.json               counts, rollouts spent per pivotal token } in question order

``pairs.jsonl`` holds exactly the preference schema of :mod:`megatron_phi4.data.preference`
(``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``source``): the DPO stage reads it as is.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from megatron_phi4.fileio import fsync_dir

__all__ = ["PTSDataError", "Question", "read_questions", "Phi4Codec", "IdMapCodec", "load_codec",
           "Journal", "export_results", "check_run_settings", "PAIR_SOURCE"]

PAIR_SOURCE = "pts"
_QUESTION_KEYS = ("id", "prompt_ids", "messages", "reference")


class PTSDataError(ValueError):
    """Invalid questions, codec, or output directory; the message names the file, line and field."""


# --------------------------------------------------------------------------------------- codecs
class Phi4Codec:
    """Token ids <-> text with the Phi-4 tokenizer (the full 100352-token vocabulary)."""

    def __init__(self, tokenizer=None):
        self._tok = tokenizer

    @property
    def tokenizer(self):
        if self._tok is None:
            from megatron_phi4.tokenizer import get_tokenizer
            self._tok = get_tokenizer()
        return self._tok

    @property
    def stop_token_ids(self) -> list[int]:
        return [100265, 100257]  # <|im_end|>, <|endoftext|>

    def encode_chat(self, messages) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


class IdMapCodec:
    """A trimmed vocabulary: model id ``i`` stands for Phi-4 id ``phi4_ids[i]``; ids beyond the map
    (padding rows a model can still emit) decode to U+FFFD, which no oracle accepts."""

    def __init__(self, phi4_ids: Sequence[int], base: Phi4Codec | None = None, source: str = "<memory>"):
        self.phi4_ids = [int(i) for i in phi4_ids]
        self._to_model = {p: i for i, p in enumerate(self.phi4_ids)}
        if len(self._to_model) != len(self.phi4_ids):
            raise PTSDataError(f"{source}: phi4_ids has duplicates")
        self.base = base or Phi4Codec()
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IdMapCodec":
        """A JSON list of Phi-4 ids, or an object with a ``phi4_ids`` list (a trimmed-vocabulary
        file, e.g. the ``vocab.json`` beside a trimmed checkpoint)."""
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PTSDataError(f"--id-map {path}: cannot read a JSON id map ({e})") from None
        ids = d.get("phi4_ids") if isinstance(d, dict) else d
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in ids):
            raise PTSDataError(f"--id-map {path}: expected a list of Phi-4 token ids, or an object with "
                               f"a 'phi4_ids' list")
        return cls(ids, source=path)

    def _model(self, phi4_ids: Sequence[int], what: str) -> list[int]:
        out = []
        for k, p in enumerate(phi4_ids):
            if p not in self._to_model:
                raise PTSDataError(f"{what}: Phi-4 token id {p} (position {k}) is not in the id map "
                                   f"{self.source}")
            out.append(self._to_model[p])
        return out

    @property
    def stop_token_ids(self) -> list[int]:
        return [self._to_model[p] for p in self.base.stop_token_ids if p in self._to_model]

    def encode_chat(self, messages) -> list[int]:
        return self._model(self.base.encode_chat(messages), "messages")

    def decode(self, ids: Sequence[int]) -> str:
        parts, run = [], []
        for i in ids:
            if 0 <= i < len(self.phi4_ids):
                run.append(self.phi4_ids[i])
            else:
                parts += [self.base.decode(run), "\ufffd"]
                run = []
        parts.append(self.base.decode(run))
        return "".join(parts)


def _import_attr(spec: str, what: str):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise PTSDataError(f"{what}: {spec!r} is not of the form 'package.module:attribute'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise PTSDataError(f"{what}: cannot import {spec!r} ({e})") from None


def load_codec(id_map: str | None = None, codec: str | None = None):
    """The codec the tool decodes with: ``codec`` ('module:attr', a codec object or a factory taking
    no arguments), else ``id_map`` (:meth:`IdMapCodec.load`), else the Phi-4 tokenizer."""
    if codec and id_map:
        raise PTSDataError("--codec and --id-map: give one, not both")
    if codec:
        obj = _import_attr(codec, "--codec")
        obj = obj() if callable(obj) and not hasattr(obj, "decode") else obj
        for need in ("decode", "encode_chat", "stop_token_ids"):
            if not hasattr(obj, need):
                raise PTSDataError(f"--codec {codec}: the codec has no {need!r} (needs decode(ids) -> str, "
                                   f"encode_chat(messages) -> ids, stop_token_ids)")
        return obj
    if id_map:
        return IdMapCodec.load(id_map)
    return Phi4Codec()


# ------------------------------------------------------------------------------------ questions
@dataclass(frozen=True)
class Question:
    index: int  # position in the questions file (export order)
    key: str  # the record's "id", or "line-N"
    prompt_ids: tuple[int, ...]
    reference: str


def read_questions(path: str | os.PathLike, codec, vocab_size: int) -> list[Question]:
    """Every question of ``path``, validated before any model work (``file:line: field: reason``)."""
    path = str(path)
    out: list[Question] = []
    seen: dict[str, int] = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise PTSDataError(f"--questions {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PTSDataError(f"{where}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise PTSDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            unknown = sorted(set(rec) - set(_QUESTION_KEYS))
            if unknown:
                raise PTSDataError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(_QUESTION_KEYS)})")
            key = rec.get("id", f"line-{lineno}")
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise PTSDataError(f"{where}: id: expected a string or an int, got {key!r}")
            key = str(key)
            if key in seen:
                raise PTSDataError(f"{where}: id: {key!r} already used on line {seen[key]}")
            seen[key] = lineno
            ref = rec.get("reference")
            if not isinstance(ref, str):
                raise PTSDataError(f"{where}: reference: expected a string, got {type(ref).__name__}")
            if ("prompt_ids" in rec) == ("messages" in rec):
                raise PTSDataError(f"{where}: give exactly one of 'prompt_ids' and 'messages'")
            if "messages" in rec:
                try:
                    ids = codec.encode_chat(rec["messages"])
                except (ValueError, TypeError, KeyError) as e:
                    raise PTSDataError(f"{where}: messages: {e}") from None
            else:
                ids = rec["prompt_ids"]
                if not isinstance(ids, list):
                    raise PTSDataError(f"{where}: prompt_ids: expected a list of token ids")
            if not ids:
                raise PTSDataError(f"{where}: the query is empty")
            for j, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                    raise PTSDataError(f"{where}: prompt_ids[{j}]: {t!r} is not a token id in [0, {vocab_size})")
            out.append(Question(len(out), key, tuple(ids), ref))
    if not out:
        raise PTSDataError(f"--questions {path}: no questions")
    return out


# -------------------------------------------------------------------------------------- journal
class Journal:
    """The append-only per-rank record of finished questions (see the module docstring)."""

    def __init__(self, output_dir: str | os.PathLike, rank: int):
        self.dir = Path(output_dir)
        self.path = self.dir / f"journal.rank{rank}.jsonl"

    @staticmethod
    def read_all(output_dir: str | os.PathLike) -> dict[str, dict]:
        """Finished questions of every rank's journal: ``{question key: record}``. A torn last line
        (a run killed while writing it) is ignored."""
        done: dict[str, dict] = {}
        for p in sorted(Path(output_dir).glob("journal.rank*.jsonl")):
            for rec in _complete_lines(p):
                done[rec["question"]] = rec
        return done

    def repair(self) -> None:
        """Drop this rank's torn last line, if any, so the next append starts on a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = list(_complete_lines(self.path))
        text = "".join(json.dumps(r) + "\n" for r in keep)
        if text.encode() != data:
            _atomic_write_lines(self.path, (json.dumps(r) for r in keep))

    def append(self, record: dict) -> None:
        """One line, one write, fsynced: the question is finished once this returns."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _complete_lines(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The text after the last newline is a torn write (or empty); every earlier line is complete.
    for lineno, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise PTSDataError(f"{path}:{lineno}: not valid JSON in the middle of a journal (edited by "
                               f"hand?); remove the line to redo that question") from None
        if not isinstance(rec, dict) or "question" not in rec:
            raise PTSDataError(f"{path}:{lineno}: not a journal record (no 'question')")
        yield rec


def _atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def check_run_settings(output_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record the run's settings on its first start; a resumed run must use the same ones (mixing
    rollout counts or thresholds in one output would make its records incomparable)."""
    path = Path(output_dir) / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        for k, v in settings.items():
            if k in old and old[k] != v:
                raise PTSDataError(f"{path}: this output directory was started with {k}={old[k]!r}, now "
                                   f"{k}={v!r}; use the same settings to resume, or another --output")
        return
    _atomic_write_lines(path, [json.dumps(settings, indent=1)])


@contextlib.contextmanager
def _export_lock(output_dir: Path):
    """Serialize exports of ranks finishing together, so the last one to export saw every journal."""
    import fcntl

    with open(output_dir / ".export.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export_results(output_dir: str | os.PathLike, questions: Sequence[Question] | None = None) -> dict:
    """Rewrite pivotal_tokens.jsonl, pairs.jsonl and summary.json from the journals (question order);
    returns the summary."""
    out = Path(output_dir)
    with _export_lock(out):
        done = Journal.read_all(out)
        order = {q.key: q.index for q in questions} if questions is not None else {}
        recs = sorted(done.values(), key=lambda r: (order.get(r["question"], r.get("index", 0)), r["question"]))
        _atomic_write_lines(out / "pivotal_tokens.jsonl", (json.dumps(p) for r in recs for p in r["pivots"]))
        _atomic_write_lines(out / "pairs.jsonl", (json.dumps(p) for r in recs for p in r["pairs"]))
        searched = [r for r in recs if r["status"] == "searched"]
        pivots = sum(len(r["pivots"]) for r in recs)
        rollouts = sum(r["rollouts"] for r in recs)
        summary = {
            "questions_done": len(recs),
            "questions_total": len(questions) if questions is not None else None,
            "questions_in_window": len(searched),
            "pivotal_tokens": pivots,
            "pairs": sum(len(r["pairs"]) for r in recs),
            "rollouts": rollouts,
            "rollouts_searching": sum(r["rollouts"] for r in searched),
            # Everything spent, the filtering of questions outside the window included.
            "rollouts_per_pivotal_token": rollouts / pivots if pivots else None,
        }
        _atomic_write_lines(out / "summary.json", [json.dumps(summary, indent=1)])
    return summary
