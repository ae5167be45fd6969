"""Refusal data against hallucination: teach the model to say "I don't know" where it usually
gets a question wrong, and to keep answering where it usually gets it right.

From questions with a known answer, bogus questions (no answer exists) and the model's sampled
answers to them (each labelled correct or not, or graded here by an oracle), Phi-4's recipe builds:

* SFT examples: (question, correct answer) where the model is usually right, (question, refusal)
  where it is usually wrong, and (bogus question, refusal) for every bogus question;
* DPO pairs: correct > refusal for every question the model sometimes answers correctly, and
  refusal > wrong for every question it sometimes answers wrongly, each response cut to its
  first 5 tokens (the paper's choice: the decision to answer or refuse is made in the first
  tokens; truncation keeps long answers from dominating the pair's log-ratio).

What the paper does not state, and is therefore ours (all options, see :class:`RefusalOptions`):
"usually" is a strict majority of the samples (``answer_above = refuse_below = 0.5``: accuracy
exactly 0.5 gives no SFT example, counted); the wrong response of a refusal > wrong pair is the
model's most frequent wrong answer (first seen among equals); any sample of a bogus question is
wrong unless labelled ``"correct": true`` (i.e. the model declined), and bogus questions with
samples also give refusal > wrong pairs; the refusal text defaults to ``"I don't know."`` (a
record may carry its own); truncation counts the ``<|im_end|>`` that closes a response, so a
short refusal keeps its end of turn; a pair whose two truncated responses are identical is
dropped (counted). SFT examples keep whole responses.

Input JSONL, one question per line::

    {"question": "...", "answer": "...",            # answer: required unless bogus
     "bogus": false, "system": "optional", "refusal": "optional per-question refusal",
     "samples": [{"text": "...", "correct": true}, ...]}   # correct: optional with an oracle

Outputs: SFT examples as chat JSONL (``{"messages": [...], "source": ...}``, the input of
tools/preprocess_chat.py) and DPO pairs as the token-id records
:class:`~megatron_phi4.data.preference.PreferenceDataset` reads.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from megatron_phi4.posttrain.records import (
    AtomicJsonlWriter, FateReport, LazyTokenizer, RecordError, prompt_messages, run_records, write_json_atomic,
)

__all__ = ["DEFAULT_REFUSAL", "RefusalOptions", "ORACLES", "load_oracle", "normalize_answer",
           "examples_from_record", "build_refusal_data", "main"]

DEFAULT_REFUSAL = "I don't know."
Oracle = Callable[[dict, str], bool]


def normalize_answer(text: str) -> str:
    """Case-folded words without punctuation or articles (the usual QA answer normalisation)."""
    text = re.sub(r"[^\w\s]", " ", text.casefold())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(record: dict, sample: str) -> bool:
    return normalize_answer(sample) == normalize_answer(record["answer"])


def contains_answer(record: dict, sample: str) -> bool:
    ref = normalize_answer(record["answer"])
    return bool(ref) and f" {ref} " in f" {normalize_answer(sample)} "


ORACLES: dict[str, Oracle] = {"exact": exact_match, "contains": contains_answer}


def load_oracle(spec: Optional[str]) -> Optional[Oracle]:
    """``None``, a built-in name (``exact``, ``contains``) or ``"module:function"`` taking
    ``(record, sample_text)`` and returning a bool."""
    if spec is None:
        return None
    if spec in ORACLES:
        return ORACLES[spec]
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"oracle: got {spec!r}, allowed: {', '.join(ORACLES)} or 'module:function'")
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"oracle: {spec!r} is not a callable")
    return fn


@dataclass(frozen=True)
class RefusalOptions:
    answer_above: float = 0.5  # ours: SFT answer when sampled accuracy > this ("usually right")
    refuse_below: float = 0.5  # ours: SFT refusal when sampled accuracy < this ("usually wrong")
    response_tokens: int = 5  # the paper's: DPO responses keep their first 5 tokens
    refusal_text: str = DEFAULT_REFUSAL  # ours
    source: str = "refusal"

    def validate(self) -> None:
        if not 0 <= self.refuse_below <= self.answer_above <= 1:
            raise ValueError(f"refuse_below ({self.refuse_below}) and answer_above ({self.answer_above}) must "
                             "satisfy 0 <= refuse_below <= answer_above <= 1")
        if self.response_tokens < 1:
            raise ValueError(f"response_tokens: must be >= 1, got {self.response_tokens}")
        if not self.refusal_text.strip():
            raise ValueError("refusal_text: must not be empty")


def _str(obj: dict, key: str, where: str, required: bool = True) -> Optional[str]:
    v = obj.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        raise RecordError(f"{where}: {key}: expected a non-empty string, got {v!r}")
    return v


def _grade(obj: dict, where: str, bogus: bool, oracle: Optional[Oracle], counts: Counter) -> list[tuple[str, bool]]:
    samples = obj.get("samples", [])
    if not isinstance(samples, list):
        raise RecordError(f"{where}: samples: expected a list of {{text, correct}} objects, got "
                          f"{type(samples).__name__}")
    if not samples and not bogus:
        raise RecordError(f"{where}: samples: a question needs at least one sampled answer to estimate "
                          "how often the model is right")
    graded = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise RecordError(f"{where}: samples[{i}]: expected an object, got {type(s).__name__}")
        unknown = set(s) - {"text", "correct"}
        if unknown:
            raise RecordError(f"{where}: samples[{i}]: unknown field {sorted(unknown)[0]!r} (allowed: text, correct)")
        text = _str(s, "text", f"{where}: samples[{i}]")
        correct = s.get("correct")
        if correct is None:
            if bogus:
                correct = False  # answering a question that has no answer is a hallucination
            elif oracle is None:
                raise RecordError(f"{where}: samples[{i}].correct: missing, and no oracle was given to grade it")
            else:
                try:
                    correct = oracle(obj, text)
                except Exception as e:  # noqa: BLE001 -- the record is named, the oracle's error kept
                    raise RecordError(f"{where}: samples[{i}]: the oracle failed: {type(e).__name__}: {e}") from e
                if not isinstance(correct, bool):
                    raise RecordError(f"{where}: samples[{i}]: the oracle returned {correct!r}, not a bool")
                counts["samples/graded_by_oracle"] += 1
        elif not isinstance(correct, bool):
            raise RecordError(f"{where}: samples[{i}].correct: expected true or false, got {correct!r}")
        graded.append((text, correct))
    return graded


def _most_common(texts: list[str]) -> str:
    counts = Counter(t.strip() for t in texts)
    best = max(counts.values())
    return next(t for t in texts if counts[t.strip()] == best)  # first seen among the most frequent


def examples_from_record(obj: Any, where: str, options: RefusalOptions, oracle: Optional[Oracle] = None,
                         tokenizer: Optional[LazyTokenizer] = None) -> tuple[list[dict], list[dict], Counter]:
    """``(sft_examples, dpo_pairs, counts)`` for one question (see the module docstring)."""
    tokenizer = tokenizer or LazyTokenizer()
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    bogus = obj.get("bogus", False)
    if not isinstance(bogus, bool):
        raise RecordError(f"{where}: bogus: expected true or false, got {bogus!r}")
    _str(obj, "question", where)
    if bogus and obj.get("answer") is not None:
        raise RecordError(f"{where}: answer: a bogus question has no answer (drop the field or set bogus false)")
    answer = None if bogus else _str(obj, "answer", where)
    refusal = _str(obj, "refusal", where, required=False) or options.refusal_text
    counts: Counter = Counter()
    graded = _grade(obj, where, bogus, oracle, counts)
    messages = prompt_messages({k: obj[k] for k in ("question", "system") if k in obj}, where)
    n_right = sum(c for _, c in graded)
    wrong = [t for t, c in graded if not c]
    tag = options.source

    sft = []
    accuracy = n_right / len(graded) if graded else 0.0
    if bogus:
        sft.append(("bogus_refusal", refusal))
    elif accuracy > options.answer_above:
        sft.append(("answer", answer))
    elif accuracy < options.refuse_below:
        sft.append(("refusal", refusal))
    else:
        counts["sft/skipped_uncertain"] += 1
    sft_out = [{"messages": messages + [{"role": "assistant", "content": text}], "source": f"{tag}/{kind}"}
               for kind, text in sft]
    for kind, _ in sft:
        counts[f"sft/{kind}"] += 1

    wanted = []
    if not bogus and n_right > 0:  # the model sometimes knows it: answering beats refusing
        wanted.append(("correct>refusal", answer, refusal))
    if wrong:  # the model sometimes gets it wrong: refusing beats a wrong answer
        wanted.append(("refusal>wrong", refusal, _most_common(wrong)))
    pairs = []
    if wanted:
        tok = tokenizer()
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        k = options.response_tokens
        for kind, chosen, rejected in wanted:
            c = (tok.encode(chosen) + [tok.im_end_id])[:k]
            r = (tok.encode(rejected) + [tok.im_end_id])[:k]
            if c == r:
                counts["dpo/skipped_identical_after_truncation"] += 1
                continue
            pairs.append({"prompt_ids": prompt, "chosen_ids": c, "rejected_ids": r, "weight": 1.0,
                          "source": f"{tag}/{kind}"})
            counts[f"dpo/{kind}"] += 1
    return sft_out, pairs, counts


class _Discard:
    """Stands in for an output the caller did not ask for (its records are still counted)."""

    def __init__(self):
        self.count = 0

    def write(self, record: dict) -> None:
        self.count += 1

    def commit(self) -> None:
        pass


def build_refusal_data(inputs: Sequence[str], sft_output: Optional[str], dpo_output: Optional[str],
                       options: RefusalOptions = RefusalOptions(), oracle: Optional[Oracle] = None,
                       report_path: Optional[str] = None, skip_invalid: bool = False, tokenizer=None) -> dict:
    """Write the SFT examples and DPO pairs of every question (each file atomically; either may be
    None to skip it) and a report (default ``<first output>.report.json``); returns the report."""
    options.validate()
    if sft_output is None and dpo_output is None:
        raise ValueError("give sft_output, dpo_output or both")
    tok = LazyTokenizer(tokenizer)
    report = FateReport("build_refusal_data")
    with contextlib.ExitStack() as stack:
        sft_w = stack.enter_context(AtomicJsonlWriter(sft_output)) if sft_output else _Discard()
        dpo_w = stack.enter_context(AtomicJsonlWriter(dpo_output)) if dpo_output else _Discard()

        def handle(where, obj):
            sft, pairs, counts = examples_from_record(obj, where, options, oracle, tok)
            for r in sft:
                sft_w.write(r)
            for p in pairs:
                dpo_w.write(p)
            report.outputs.update(counts)
            return "used" if (sft or pairs) else "unused"

        run_records(inputs, report, handle, skip_invalid)
        sft_w.commit()
        dpo_w.commit()
    result = report.to_dict(inputs=list(inputs), sft_output=sft_output, dpo_output=dpo_output,
                            options=vars(options), sft_examples=sft_w.count if sft_output else None,
                            dpo_pairs=dpo_w.count if dpo_output else None)
    write_json_atomic(report_path or (sft_output or dpo_output) + ".report.json", result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="build_refusal_data", description=(
        "Build refusal SFT examples and DPO pairs (correct > refusal > wrong, responses cut to their "
        "first tokens) from questions and sampled model answers. See docs/posttraining.md."))
    p.add_argument("inputs", nargs="+", help="JSONL files, one question per line")
    p.add_argument("--sft-output", help="SFT chat JSONL (input of tools/preprocess_chat.py)")
    p.add_argument("--dpo-output", help="DPO pairs JSONL (token ids)")
    p.add_argument("--report", help="report JSON (default: first output + .report.json)")
    p.add_argument("--oracle", help="grade samples without a 'correct' label: exact, contains, or module:function")
    p.add_argument("--answer-above", type=float, default=0.5, help="SFT answer when sampled accuracy > this")
    p.add_argument("--refuse-below", type=float, default=0.5, help="SFT refusal when sampled accuracy < this")
    p.add_argument("--response-tokens", type=int, default=5, help="DPO responses keep this many first tokens")
    p.add_argument("--refusal-text", default=DEFAULT_REFUSAL)
    p.add_argument("--source", default="refusal", help="source tag prefix")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records (each counted and listed in the report) instead of stopping")
    args = p.parse_args(argv)
    if not args.sft_output and not args.dpo_output:
        p.error("give --sft-output, --dpo-output or both")
    options = RefusalOptions(args.answer_above, args.refuse_below, args.response_tokens, args.refusal_text,
                             args.source)
    try:
        report = build_refusal_data(args.inputs, args.sft_output, args.dpo_output, options,
                                    load_oracle(args.oracle), args.report, args.skip_invalid)
    except (RecordError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"[build_refusal_data] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    fates = ", ".join(f"{k} {v}" for k, v in report["fates"].items())
    print(f"[build_refusal_data] {report['records']} records ({fates}); {report['sft_examples']} SFT examples, "
          f"{report['dpo_pairs']} DPO pairs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
