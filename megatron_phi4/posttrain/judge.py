"""Judge-guided preference pairs (Phi-4's second DPO round): responses scored by a judge on
accuracy, style and detail (1-5 each) become chosen/rejected pairs.

The paper's rule (as summarised in docs/posttraining.md): the response with the higher accuracy is
chosen, or -- when accuracy does not separate them -- the one with the higher mean of accuracy,
style and detail; the label is binary. Two choices are ours because the paper does not state them:
a pair whose accuracy and mean are both equal is a tie and yields no pair (counted), and when
several responses answer one prompt every decidable combination becomes a pair (``pairing="all"``)
unless ``pairing="best_worst"`` asks for one pair per prompt. Weighting a pair by its score margin
(``weight="margin"``: the deciding difference / 4, in (0, 1]) is this project's extension; the
default weight is 1, the paper's binary label.

Any judge works: a record carries either the parsed ``scores`` or the judge's raw ``judge_output``,
which :func:`parse_judge_scores` reads -- the JSON line :data:`JUDGE_PROMPT_TEMPLATE` asks for, or
``Accuracy: 4``-style lines -- and rejects with a reason when scores are missing, conflicting, not
integers or outside 1-5.

Input JSONL, one prompt per line::

    {"prompt_ids": [...]}  or  {"messages": [...]}  or  {"prompt": "text", "system": "optional"},
    "responses": [{"response_ids": [...]} or {"text": "..."},
                  plus {"scores": {"accuracy": 4, "style": 3, "detail": 5}} or {"judge_output": "..."}],
    "source": "optional tag (default 'judge')"

Output: the pair records :class:`~megatron_phi4.data.preference.PreferenceDataset` reads
(``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``weight``, ``source``). Text is encoded with
the Phi-4 chat format: the prompt ends with the assistant header, a response ends with
``<|im_end|>``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from megatron_phi4.posttrain.records import (
    AtomicJsonlWriter, FateReport, LazyTokenizer, RecordError, prompt_ids_of, response_ids_of, run_records,
    token_ids, write_json_atomic,
)

__all__ = ["CRITERIA", "JUDGE_PROMPT_TEMPLATE", "JudgeScores", "JudgeParseError", "render_judge_prompt",
           "parse_judge_scores", "compare", "JudgePairOptions", "pairs_from_record", "build_judge_pairs", "main"]

CRITERIA = ("accuracy", "style", "detail")
RULES = ("accuracy_then_mean", "mean")
PAIRINGS = ("all", "best_worst")
WEIGHTS = ("none", "margin")

JUDGE_PROMPT_TEMPLATE = """\
You are grading one assistant response to a user's request. Score it on three criteria, each an \
integer from 1 (poor) to 5 (excellent):
- accuracy: is everything it states correct, and does it do what was asked? If the request has a \
definite answer, a wrong final answer scores at most 2.
- style: is it clear, well organised and as concise as the request allows?
- detail: does it give the steps, reasons or facts the request needs, without padding?
Score accuracy first, independently of style and length.

[REQUEST]
{question}
[END REQUEST]

[RESPONSE]
{response}
[END RESPONSE]

Reason briefly, then end your reply with exactly one line of JSON and nothing after it:
{"accuracy": <1-5>, "style": <1-5>, "detail": <1-5>}"""


class JudgeParseError(ValueError):
    """A judge's output holds no usable scores; the message says what is wrong."""


@dataclass(frozen=True)
class JudgeScores:
    accuracy: int
    style: int
    detail: int

    @property
    def total(self) -> int:
        return self.accuracy + self.style + self.detail

    @property
    def mean(self) -> float:
        return self.total / 3.0


def render_judge_prompt(question: str, response: str) -> str:
    """The judge request for one response (send it as the user turn of any chat model)."""
    return JUDGE_PROMPT_TEMPLATE.replace("{question}", question).replace("{response}", response)


def _score(value: Any, name: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JudgeParseError(f"{name}: expected an integer score 1-5, got {value!r}")
    if value != int(value):
        raise JudgeParseError(f"{name}: expected an integer score 1-5, got {value!r}")
    if not 1 <= value <= 5:
        raise JudgeParseError(f"{name}: score {int(value)} outside 1-5")
    return int(value)


def scores_from_mapping(scores: Mapping[str, Any]) -> JudgeScores:
    lower = {str(k).strip().lower(): v for k, v in scores.items()}
    missing = [c for c in CRITERIA if c not in lower]
    if missing:
        raise JudgeParseError(f"missing score(s): {', '.join(missing)} (need {', '.join(CRITERIA)})")
    return JudgeScores(*(_score(lower[c], c) for c in CRITERIA))


_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_SCORE_LINE = re.compile(
    r"^[\s>*_#\-]*(accuracy|style|detail)\b[\s*_]*(?:score)?[\s*_]*[:=][\s*_]*(-?\d+(?:\.\d+)?)\s*(?:/\s*5)?",
    re.IGNORECASE | re.MULTILINE)


def parse_judge_scores(text: Any) -> JudgeScores:
    """Scores from a judge's raw output: the last JSON object naming a criterion, else
    ``Accuracy: n`` / ``**Style**: n/5`` lines (a criterion given twice must agree)."""
    if not isinstance(text, str) or not text.strip():
        raise JudgeParseError("empty judge output")
    for candidate in reversed(_JSON_OBJECT.findall(text)):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and any(str(k).strip().lower() in CRITERIA for k in obj):
            return scores_from_mapping(obj)
    found: dict[str, int] = {}
    for name, value in _SCORE_LINE.findall(text):
        name = name.lower()
        v = _score(float(value), name)
        if name in found and found[name] != v:
            raise JudgeParseError(f"{name}: conflicting scores {found[name]} and {v}")
        found[name] = v
    if not found:
        raise JudgeParseError('no scores found (expected a JSON line {"accuracy": n, "style": n, "detail": n} '
                              "or 'Accuracy: n' lines)")
    return scores_from_mapping(found)


def _key(s: JudgeScores, rule: str) -> tuple:
    # sums instead of means: exact integer comparisons, same order
    return (s.accuracy, s.total) if rule == "accuracy_then_mean" else (s.total,)


def compare(a: JudgeScores, b: JudgeScores, rule: str = "accuracy_then_mean") -> tuple[int, float]:
    """``(sign, margin)``: sign +1 if ``a`` is preferred, -1 if ``b``, 0 for a tie; margin is the
    deciding difference in score points (accuracy, or the mean of the three)."""
    if rule not in RULES:
        raise ValueError(f"rule: got {rule!r}, allowed: {', '.join(RULES)}")
    if rule == "accuracy_then_mean" and a.accuracy != b.accuracy:
        d = a.accuracy - b.accuracy
        return (1 if d > 0 else -1), float(abs(d))
    d = a.total - b.total
    return (0 if d == 0 else 1 if d > 0 else -1), abs(d) / 3.0


@dataclass(frozen=True)
class JudgePairOptions:
    rule: str = "accuracy_then_mean"  # the paper's
    pairing: str = "all"  # ours: every decidable combination, or best_worst (one per prompt)
    weight: str = "none"  # ours: "margin" weights a pair by its deciding margin / 4
    min_margin: float = 0.0  # ours: drop (and count) pairs decided by less than this many points
    source: str = "judge"

    def validate(self) -> None:
        for name, value, allowed in (("rule", self.rule, RULES), ("pairing", self.pairing, PAIRINGS),
                                     ("weight", self.weight, WEIGHTS)):
            if value not in allowed:
                raise ValueError(f"{name}: got {value!r}, allowed: {', '.join(allowed)}")
        if not 0 <= self.min_margin <= 4:
            raise ValueError(f"min_margin: must be in [0, 4] score points, got {self.min_margin}")


def _response(obj: Any, where: str, i: int, tokenizer: LazyTokenizer) -> tuple[list[int], JudgeScores]:
    field = f"responses[{i}]"
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: {field}: expected an object, got {type(obj).__name__}")
    if ("response_ids" in obj) == ("text" in obj):
        raise RecordError(f"{where}: {field}: give exactly one of response_ids and text")
    if ("scores" in obj) == ("judge_output" in obj):
        raise RecordError(f"{where}: {field}: give exactly one of scores and judge_output")
    try:
        if "scores" in obj:
            if not isinstance(obj["scores"], dict):
                raise JudgeParseError(f"expected an object, got {type(obj['scores']).__name__}")
            scores = scores_from_mapping(obj["scores"])
        else:
            scores = parse_judge_scores(obj["judge_output"])
    except JudgeParseError as e:
        raise RecordError(f"{where}: {field}.{'scores' if 'scores' in obj else 'judge_output'}: {e}") from None
    if "response_ids" in obj:
        ids = token_ids(obj["response_ids"], where, f"{field}.response_ids")
    else:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise RecordError(f"{where}: {field}.text: expected a non-empty string")
        ids = response_ids_of(obj["text"], tokenizer)
    return ids, scores


def pairs_from_record(obj: Any, where: str, options: JudgePairOptions,
                      tokenizer: Optional[LazyTokenizer] = None) -> tuple[list[dict], Counter, str]:
    """``(pairs, counts, fate)`` for one input record (every response is validated first, so a bad
    response rejects the whole record: its other pairs would be judged against a partial set)."""
    tokenizer = tokenizer or LazyTokenizer()
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    responses = obj.get("responses")
    if not isinstance(responses, list):
        raise RecordError(f"{where}: responses: expected a list of judged responses, got "
                          f"{type(responses).__name__}")
    source = obj.get("source", options.source)
    if not isinstance(source, str):
        raise RecordError(f"{where}: source: expected a string, got {source!r}")
    prompt = prompt_ids_of(obj, where, tokenizer)
    judged = [_response(r, where, i, tokenizer) for i, r in enumerate(responses)]
    counts: Counter = Counter()
    if len(judged) < 2:
        return [], counts, "too_few_responses"
    if options.pairing == "all":
        candidates = [(i, j) for i in range(len(judged)) for j in range(i + 1, len(judged))]
    else:  # best_worst: the top and bottom responses by the rule (first seen wins among equals)
        order = sorted(range(len(judged)), key=lambda k: _key(judged[k][1], options.rule), reverse=True)
        candidates = [(order[0], order[-1])]
    pairs = []
    for i, j in candidates:
        sign, margin = compare(judged[i][1], judged[j][1], options.rule)
        if sign == 0:
            counts["ties"] += 1
            continue
        chosen, rejected = (judged[i], judged[j]) if sign > 0 else (judged[j], judged[i])
        if margin < options.min_margin:
            counts["below_min_margin"] += 1
            continue
        if chosen[0] == rejected[0]:
            counts["identical_responses"] += 1
            continue
        weight = margin / 4.0 if options.weight == "margin" else 1.0
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen[0], "rejected_ids": rejected[0],
                      "weight": weight, "source": source})
    return pairs, counts, ("paired" if pairs else "no_preference")


def build_judge_pairs(inputs: Sequence[str], output: str, options: JudgePairOptions = JudgePairOptions(),
                      report_path: Optional[str] = None, skip_invalid: bool = False,
                      tokenizer=None) -> dict:
    """Write the pairs of every input record to ``output`` (atomically) and the report (``output +
    '.report.json'`` unless given); returns the report."""
    options.validate()
    tok = LazyTokenizer(tokenizer)
    report = FateReport("build_judge_pairs")
    with AtomicJsonlWriter(output) as out:
        def handle(where, obj):
            pairs, counts, fate = pairs_from_record(obj, where, options, tok)
            for p in pairs:
                out.write(p)
            report.outputs.update(counts)
            report.outputs["pairs"] += len(pairs)
            return fate

        run_records(inputs, report, handle, skip_invalid)
        out.commit()
    result = report.to_dict(inputs=list(inputs), output=output, options=vars(options))
    write_json_atomic(report_path or output + ".report.json", result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="build_judge_pairs", description=(
        "Turn judge-scored responses (accuracy, style, detail; 1-5) into DPO pair records "
        "(token ids) by Phi-4's rule. See docs/posttraining.md."))
    p.add_argument("inputs", nargs="*", help="JSONL files of judged responses (one prompt per line)")
    p.add_argument("--output", help="output pairs JSONL (written atomically)")
    p.add_argument("--report", help="report JSON (default: OUTPUT.report.json)")
    p.add_argument("--rule", choices=RULES, default="accuracy_then_mean",
                   help="accuracy_then_mean: the paper's; mean: compare the mean of the three scores only")
    p.add_argument("--pairing", choices=PAIRINGS, default="all")
    p.add_argument("--weight", choices=WEIGHTS, default="none",
                   help="margin: weight = deciding score margin / 4 (this project's extension)")
    p.add_argument("--min-margin", type=float, default=0.0, help="skip pairs decided by fewer score points")
    p.add_argument("--source", default="judge", help="source tag for records without one")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records (each counted and listed in the report) instead of stopping")
    p.add_argument("--print-template", action="store_true", help="print the judge prompt template and exit")
    args = p.parse_args(argv)
    if args.print_template:
        print(JUDGE_PROMPT_TEMPLATE)
        return 0
    if not args.inputs or not args.output:
        p.error("inputs and --output are required")
    options = JudgePairOptions(args.rule, args.pairing, args.weight, args.min_margin, args.source)
    try:
        report = build_judge_pairs(args.inputs, args.output, options, args.report, args.skip_invalid)
    except (RecordError, ValueError, FileNotFoundError) as e:
        print(f"[build_judge_pairs] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    fates = ", ".join(f"{k} {v}" for k, v in report["fates"].items())
    print(f"[build_judge_pairs] {report['records']} records ({fates}); {report['outputs'].get('pairs', 0)} pairs "
          f"-> {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
