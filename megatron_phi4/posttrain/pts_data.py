"""Files of the Pivotal Token Search tool: the questions it reads, the token codec (with the hook for
a trimmed vocabulary), the journal that makes it resumable, and the records and DPO pairs it exports.

Questions (JSONL, one object per line)::

    {"id": "gsm8k-17",                       # optional, unique (default: "line-N")
     "prompt_ids": [100264, 882, ...],       # the query as the model's token ids, generation
                                             # header included ...
     "messages": [{"role": "user", "content": "..."}],  # ... or chat messages (ending with the
     "prompt": "...", "system": "...",       # user turn), or prompt / question text with an optional
                                             # system text: encoded with the generation header
     "reference": "42",                      # what the oracle checks a response against (an answer,
                                             # a choice letter, test code): a string
     "meta": {...}}                          # optional, ignored (your bookkeeping)

Token ids are the model's throughout. For a model trained on a trimmed vocabulary, ``prompt_ids``
and every id the tool writes are trimmed ids; the id map translates only where text is involved
(chat messages in, responses out to the oracle). Nothing is decoded and re-encoded on the way to
a pair, so token boundaries never drift.

Output directory::

    run.json                   the settings of the run (a resumed run must use the same ones)
    journal.rank<R>.jsonl      one line per finished question, appended and fsynced by data-parallel
                               rank R: the commit point (a killed run loses at most the question in
                               flight; a torn last line is dropped on restart)
    pivotal_tokens.jsonl       one record per pivotal token            } rebuilt from the journals
    pairs.jsonl                one DPO pair per verified pivotal token  } (atomically, question
    summary.json               counts, rollouts spent per pivotal token } order) after every run

``pairs.jsonl`` holds exactly the schema of :mod:`megatron_phi4.data.preference` (``prompt_ids``,
``chosen_ids``, ``rejected_ids``, ``source``): the DPO stage reads it as it is.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from megatron_phi4.posttrain.records import (
    AtomicJsonlWriter, RecordError, iter_jsonl, prompt_messages, token_ids, write_json_atomic,
)
from megatron_phi4.tokenizer import EOD_ID, IM_END_ID

__all__ = ["PTSDataError", "IdMap", "JsonIdMap", "load_id_map", "TokenCodec", "Question", "read_questions",
           "Journal", "pair_record", "export_results", "check_run_settings", "PAIR_SOURCE", "import_attr"]

PAIR_SOURCE = "pts"
_QUESTION_KEYS = ("id", "prompt_ids", "messages", "prompt", "question", "system", "reference", "meta")
_UNMAPPED = "\ufffd"  # the text of a model id that stands for no Phi-4 token (no oracle accepts it)


class PTSDataError(ValueError):
    """Invalid questions, id map, settings or output directory; names the file, line and field."""


def import_attr(spec: str, what: str):
    """``package.module:attribute`` (dots allowed after the colon, e.g. ``mod:Class.factory``)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise PTSDataError(f"{what}: {spec!r} is not of the form 'package.module:attribute'")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise PTSDataError(f"{what}: cannot import {spec!r} ({e})") from None
    return obj


# ------------------------------------------------------------------------------------- id maps
class IdMap(Protocol):
    """The hook for a model trained on a trimmed vocabulary: model ids <-> Phi-4 ids. Both methods
    raise ValueError naming the first id without a counterpart. ``TrimmedVocab``
    (``megatron_phi4.demo.trimmed_vocab``) is one."""

    def to_phi4(self, model_ids: Sequence[int]) -> list[int]: ...

    def to_trimmed(self, phi4_ids: Sequence[int]) -> list[int]: ...


class JsonIdMap:
    """The id map of a JSON file: a list of Phi-4 ids (model id ``i`` stands for ``phi4_ids[i]``) or an
    object with a ``phi4_ids`` list -- which is what a trimmed-vocabulary ``vocab.json`` holds, so the
    tool reads one without importing the code that wrote it."""

    def __init__(self, phi4_ids: Sequence[int], source: str = "<memory>"):
        self.phi4_ids = [int(i) for i in phi4_ids]
        self.source = source
        self._to_model = {p: i for i, p in enumerate(self.phi4_ids)}
        if len(self._to_model) != len(self.phi4_ids):
            raise PTSDataError(f"--id-map {source}: phi4_ids has duplicates")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "JsonIdMap":
        path = str(path)
        if os.path.isdir(path):
            path = os.path.join(path, "vocab.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PTSDataError(f"--id-map {path}: cannot read a JSON id map ({e})") from None
        ids = d.get("phi4_ids") if isinstance(d, dict) else d
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise PTSDataError(f"--id-map {path}: phi4_ids: expected a non-empty list of Phi-4 token ids "
                               f"(a JSON list, or an object with a 'phi4_ids' list)")
        return cls(ids, source=path)

    def to_phi4(self, model_ids: Sequence[int]) -> list[int]:
        out = []
        for k, i in enumerate(model_ids):
            if not 0 <= i < len(self.phi4_ids):
                raise ValueError(f"model token id {i} (position {k}) stands for no Phi-4 token in {self.source}")
            out.append(self.phi4_ids[i])
        return out

    def to_trimmed(self, phi4_ids: Sequence[int]) -> list[int]:
        out = []
        for k, p in enumerate(phi4_ids):
            if p not in self._to_model:
                raise ValueError(f"Phi-4 token id {p} (position {k}) is not in the id map {self.source}")
            out.append(self._to_model[p])
        return out


def load_id_map(spec: str | None):
    """``--id-map``: None; a JSON file or a directory holding ``vocab.json`` (:class:`JsonIdMap`); or
    ``module:attribute`` naming an :class:`IdMap` or a factory that takes no arguments."""
    if spec is None:
        return None
    if os.path.exists(spec) or ":" not in spec:
        return JsonIdMap.load(spec)
    obj = import_attr(spec, "--id-map")
    if not hasattr(obj, "to_phi4") and callable(obj):
        obj = obj()
    if not (hasattr(obj, "to_phi4") and hasattr(obj, "to_trimmed")):
        raise PTSDataError(f"--id-map {spec}: needs to_phi4(model_ids) and to_trimmed(phi4_ids)")
    return obj


class TokenCodec:
    """Model token ids <-> text, for the only two places text appears: chat messages in, responses
    out to the oracle. ``id_map``: None (the model speaks Phi-4 ids) or an :class:`IdMap`."""

    def __init__(self, id_map: IdMap | None = None, tokenizer=None):
        self.id_map = id_map
        self._tok = tokenizer

    @property
    def tokenizer(self):
        if self._tok is None:
            from megatron_phi4.tokenizer import get_tokenizer
            self._tok = get_tokenizer()
        return self._tok

    def to_model(self, phi4_ids: Sequence[int]) -> list[int]:
        return list(phi4_ids) if self.id_map is None else list(self.id_map.to_trimmed(list(phi4_ids)))

    @property
    def stop_token_ids(self) -> list[int]:
        """``<|im_end|>`` and ``<|endoftext|>`` as model ids (those the id map has)."""
        out = []
        for p in (IM_END_ID, EOD_ID):
            try:
                out += self.to_model([p])
            except ValueError:
                pass
        return out

    def encode_chat(self, messages) -> list[int]:
        return self.to_model(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def decode(self, model_ids: Sequence[int]) -> str:
        """The text of ``model_ids``; an id the map cannot translate (a padding row a trimmed model
        can still sample) reads as U+FFFD."""
        ids = [int(i) for i in model_ids]
        if self.id_map is None:
            return self.tokenizer.decode(ids)
        try:
            return self.tokenizer.decode(self.id_map.to_phi4(ids))
        except ValueError:
            pass
        parts, run = [], []
        for i in ids:
            try:
                run += self.id_map.to_phi4([i])
            except ValueError:
                parts += [self.tokenizer.decode(run), _UNMAPPED]
                run = []
        parts.append(self.tokenizer.decode(run))
        return "".join(parts)


# ------------------------------------------------------------------------------------ questions
@dataclass(frozen=True)
class Question:
    index: int  # position in the questions file (export order)
    key: str  # the record's "id", or "line-N"
    where: str  # file:line, for messages
    prompt_ids: tuple[int, ...]
    reference: str


def read_questions(path: str | os.PathLike, codec: TokenCodec, vocab_size: int) -> list[Question]:
    """Every question of ``path``, validated before any model work (``file:line: field: reason``)."""
    path = str(path)
    if not os.path.isfile(path):
        raise PTSDataError(f"--questions {path}: no such file")
    out: list[Question] = []
    seen: dict[str, str] = {}
    try:
        for where, rec in iter_jsonl([path]):
            if isinstance(rec, RecordError):
                raise rec
            if not isinstance(rec, dict):
                raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            unknown = sorted(set(rec) - set(_QUESTION_KEYS))
            if unknown:
                raise RecordError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(_QUESTION_KEYS)})")
            key = rec.get("id", f"line-{where.rsplit(':', 1)[1]}")
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise RecordError(f"{where}: id: expected a string or an int, got {key!r}")
            key = str(key)
            if key in seen:
                raise RecordError(f"{where}: id: {key!r} is already used at {seen[key]}")
            seen[key] = where
            ref = rec.get("reference")
            if not isinstance(ref, str) or not ref.strip():
                raise RecordError(f"{where}: reference: expected a non-empty string, got {ref!r}")
            if "prompt_ids" in rec:
                if any(k in rec for k in ("messages", "prompt", "question", "system")):
                    raise RecordError(f"{where}: give the query once: prompt_ids, or messages / prompt / "
                                      f"question text, not both")
                ids = token_ids(rec["prompt_ids"], where, "prompt_ids", vocab_size)
            else:
                try:
                    ids = codec.encode_chat(prompt_messages(rec, where))
                except ValueError as e:  # a token the id map lacks
                    raise RecordError(f"{where}: messages: {e}") from None
                ids = token_ids(ids, where, "the encoded query", vocab_size)
            out.append(Question(len(out), key, where, tuple(ids), ref))
    except RecordError as e:
        raise PTSDataError(str(e)) from None
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
        if self.path.exists() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size:
            with AtomicJsonlWriter(str(self.path)) as w:
                for rec in _complete_lines(self.path):
                    w.write(rec)
                w.commit()

    def append(self, record: dict) -> None:
        """One line, one write, fsynced: the question is finished once this returns."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
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


def check_run_settings(output_dir: str | os.PathLike, settings: dict[str, Any], write: bool = True) -> None:
    """A resumed run must use the settings it was started with (mixing rollout counts or
    thresholds in one output would make its records incomparable); the first start records them."""
    path = Path(output_dir) / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PTSDataError(f"{path}: not valid JSON ({e}); restore it or use another --output") from None
        changed = [k for k in settings if k in old and old[k] != settings[k]]
        if changed:
            k = changed[0]
            raise PTSDataError(f"{path}: this output directory was started with {k}={old[k]!r}, now {k}="
                               f"{settings[k]!r}; use the same settings to resume, or another --output")
    elif write:
        write_json_atomic(str(path), settings)


# -------------------------------------------------------------------------------------- exports
def pair_record(pivot: dict) -> dict | None:
    """The DPO pair of a pivotal-token record (None when no alternative was verified): prompt =
    query + prefix, completions = the two single tokens, as token ids."""
    if not pivot.get("pair"):
        return None
    return {"prompt_ids": pivot["prompt_ids"], "chosen_ids": [pivot["pair"]["chosen_id"]],
            "rejected_ids": [pivot["pair"]["rejected_id"]], "source": PAIR_SOURCE}


@contextlib.contextmanager
def _export_lock(output_dir: Path):
    """Serialize the exports of ranks finishing together, so the last one to export saw every
    journal complete."""
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
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
        pivots = [p for r in recs for p in r["pivots"]]
        pairs = [pr for pr in map(pair_record, pivots) if pr is not None]
        for name, rows in (("pivotal_tokens.jsonl", pivots), ("pairs.jsonl", pairs)):
            with AtomicJsonlWriter(str(out / name)) as w:
                for row in rows:
                    w.write(row)
                w.commit()
        statuses: dict[str, int] = {}
        for r in recs:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        rollouts = sum(r["rollouts"] for r in recs)
        summary = {
            "questions_total": len(questions) if questions is not None else None,
            "questions_done": len(recs),
            "questions_by_status": dict(sorted(statuses.items())),
            "pivotal_tokens": len(pivots),
            "pairs": len(pairs),
            "pivotal_tokens_without_pair": len(pivots) - len(pairs),
            "rollouts": rollouts,
            "rollouts_searching": sum(r["rollouts"] for r in recs if r["status"] == "searched"),
            # Everything spent, the rollouts that filtered questions out of the window included.
            "rollouts_per_pivotal_token": rollouts / len(pivots) if pivots else None,
            "rollouts_per_pair": rollouts / len(pairs) if pairs else None,
            "bad_references": [f"{r['question']}: {r['error']}" for r in recs if r["status"] == "bad_reference"],
        }
        write_json_atomic(str(out / "summary.json"), summary)
    return summary
