"""Judge-guided pairs: score parsing (good and malformed judge output), the paper's preference rule,
pairing and weights, and the tool end to end (atomic output, every record's fate reported)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_phi4.data.preference import PreferenceDataset
from megatron_phi4.posttrain.judge import (
    JUDGE_PROMPT_TEMPLATE, JudgePairOptions, JudgeParseError, JudgeScores, build_judge_pairs, compare, main,
    pairs_from_record, parse_judge_scores, render_judge_prompt,
)
from megatron_phi4.posttrain.records import RecordError
from megatron_phi4.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def S(a, s, d):
    return {"accuracy": a, "style": s, "detail": d}


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text,expected", [
    ('The answer is right.\n{"accuracy": 5, "style": 4, "detail": 3}', (5, 4, 3)),
    ('draft {"accuracy": 1, "style": 1, "detail": 1}\nfinal: {"Accuracy": 4, "Style": "4", "Detail": 2.0}', (4, 4, 2)),
    ("**Accuracy**: 4/5\n- Style: 3\n### Detail score: 2", (4, 3, 2)),
    ("Accuracy = 5\nStyle: 5\nDetail: 1\nAccuracy: 5", (5, 5, 1)),  # repeated but consistent
])
def test_parse_accepts_the_template_json_and_score_lines(text, expected):
    assert parse_judge_scores(text) == JudgeScores(*expected)


@pytest.mark.parametrize("text,message", [
    ("", "empty judge output"),
    (None, "empty judge output"),
    ("I think this response is quite good overall.", "no scores found"),
    ('{"accuracy": 4, "style": 3}', "missing score.*detail"),
    ("Accuracy: 4\nStyle: 4", "missing score.*detail"),
    ("Accuracy: 6\nStyle: 3\nDetail: 3", "accuracy: score 6 outside 1-5"),
    ('{"accuracy": 0, "style": 3, "detail": 3}', "accuracy: score 0 outside 1-5"),
    ("Accuracy: 3.5\nStyle: 3\nDetail: 3", "accuracy: expected an integer score 1-5, got 3.5"),
    ('{"accuracy": "high", "style": 3, "detail": 3}', "accuracy: expected an integer.*'high'"),
    ('{"accuracy": true, "style": 3, "detail": 3}', "accuracy: expected an integer"),
    ("Accuracy: 2\nStyle: 3\nDetail: 3\nAccuracy: 4", "accuracy: conflicting scores 2 and 4"),
    (JUDGE_PROMPT_TEMPLATE, "no scores found"),  # the template's placeholder line is not a score
])
def test_parse_rejects_malformed_judge_output_with_a_reason(text, message):
    with pytest.raises(JudgeParseError, match=message):
        parse_judge_scores(text)


def test_template_renders_question_and_response_and_its_format_parses():
    prompt = render_judge_prompt("What is 2+2?", "4")
    assert "What is 2+2?" in prompt and "[RESPONSE]\n4\n" in prompt
    assert all(c in prompt for c in ("accuracy", "style", "detail"))
    reply = 'It is correct and brief.\n{"accuracy": 5, "style": 5, "detail": 3}'
    assert parse_judge_scores(reply) == JudgeScores(5, 5, 3)


# ------------------------------------------------------------------ the rule
def test_accuracy_decides_then_the_mean_then_a_tie():
    accurate, polished = JudgeScores(4, 1, 1), JudgeScores(3, 5, 5)
    assert compare(accurate, polished) == (1, 1.0)
    assert compare(polished, accurate) == (-1, 1.0)
    assert compare(JudgeScores(3, 4, 4), JudgeScores(3, 2, 3)) == (1, pytest.approx(1.0))  # mean 11/3 vs 8/3
    assert compare(JudgeScores(3, 4, 2), JudgeScores(3, 2, 4))[0] == 0
    assert compare(accurate, polished, rule="mean")[0] == -1  # the mean-only rule disagrees
    with pytest.raises(ValueError, match="rule"):
        compare(accurate, polished, rule="style")


def record(scores, ids=None, **extra):
    ids = ids or [[10 + i, 20 + i] for i in range(len(scores))]
    return {"prompt_ids": [1, 2, 3], "responses": [{"response_ids": r, "scores": s} for r, s in zip(ids, scores)],
            **extra}


def test_all_pairs_best_worst_ties_and_margin_weights():
    rec = record([S(5, 3, 3), S(2, 5, 5), S(5, 3, 3), S(5, 4, 4)])
    pairs, counts, fate = pairs_from_record(rec, "f:1", JudgePairOptions())
    # 6 combinations: (0,2) tie; 0>1, 3>1, 2>1 by accuracy; 3>0, 3>2 by mean
    assert fate == "paired" and len(pairs) == 5 and counts["ties"] == 1
    assert all(p["weight"] == 1.0 and p["prompt_ids"] == [1, 2, 3] for p in pairs)
    assert {(tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in pairs} == {
        ((10, 20), (11, 21)), ((12, 22), (11, 21)), ((13, 23), (11, 21)), ((13, 23), (10, 20)), ((13, 23), (12, 22))}
    best, _, _ = pairs_from_record(rec, "f:1", JudgePairOptions(pairing="best_worst", weight="margin"))
    assert len(best) == 1 and best[0]["chosen_ids"] == [13, 23] and best[0]["rejected_ids"] == [11, 21]
    assert best[0]["weight"] == pytest.approx(3 / 4)  # accuracy 5 vs 2
    weighted, _, _ = pairs_from_record(rec, "f:1", JudgePairOptions(weight="margin"))
    assert sorted(p["weight"] for p in weighted) == pytest.approx([1 / 6, 1 / 6, 3 / 4, 3 / 4, 3 / 4])
    strict, counts, _ = pairs_from_record(rec, "f:1", JudgePairOptions(min_margin=1.0))
    assert len(strict) == 3 and counts["below_min_margin"] == 2


def test_record_fates_without_pairs():
    assert pairs_from_record(record([S(3, 3, 3)]), "f:1", JudgePairOptions())[2] == "too_few_responses"
    _, counts, fate = pairs_from_record(record([S(3, 3, 3), S(3, 2, 4)]), "f:1", JudgePairOptions())
    assert fate == "no_preference" and counts["ties"] == 1
    _, counts, fate = pairs_from_record(record([S(5, 3, 3), S(1, 3, 3)], ids=[[7], [7]]), "f:1", JudgePairOptions())
    assert fate == "no_preference" and counts["identical_responses"] == 1


@pytest.mark.parametrize("rec,message", [
    ([1, 2], "f:3: expected a JSON object"),
    ({"prompt_ids": [1], "responses": "a, b"}, "f:3: responses: expected a list"),
    ({"responses": []}, "f:3: prompt: missing"),
    ({"prompt": " ", "responses": []}, "f:3: prompt: expected a non-empty string"),
    ({"prompt_ids": [], "responses": []}, "f:3: prompt_ids: expected a non-empty list"),
    ({"prompt_ids": [1, 200000], "responses": []}, r"f:3: prompt_ids\[1\]: expected a token id"),
    (record([S(3, 3, 3), {"accuracy": 3}]), r"f:3: responses\[1\].scores: missing score.*style, detail"),
    ({"prompt_ids": [1], "responses": [{"response_ids": [5], "judge_output": "Great answer!"}]},
     r"f:3: responses\[0\].judge_output: no scores found"),
    ({"prompt_ids": [1], "responses": [{"response_ids": [5]}]},
     r"f:3: responses\[0\]: give exactly one of scores and judge_output"),
    ({"prompt_ids": [1], "responses": [{"response_ids": [5], "text": "x", "scores": S(1, 1, 1)}]},
     r"f:3: responses\[0\]: give exactly one of response_ids and text"),
    ({"prompt_ids": [1], "responses": [{"response_ids": ["5"], "scores": S(1, 1, 1)}]},
     r"f:3: responses\[0\].response_ids\[0\]: expected a token id"),
    ({"messages": [{"role": "assistant", "content": "hi"}], "responses": []},
     "f:3: messages: the last message must be the user turn"),
])
def test_malformed_records_name_file_line_and_field(rec, message):
    with pytest.raises(RecordError, match=message):
        pairs_from_record(rec, "f:3", JudgePairOptions())


# ------------------------------------------------------------------ the tool
GOOD = [
    record([S(5, 4, 4), S(2, 5, 5)], source="math"),
    {"prompt": "What is 2+2?", "system": "Be brief.",
     "responses": [{"text": "4", "judge_output": 'ok\n{"accuracy": 5, "style": 5, "detail": 4}'},
                   {"text": "5", "judge_output": "Accuracy: 1\nStyle: 4\nDetail: 4"}]},
    record([S(3, 3, 3), S(3, 3, 3)]),  # a tie: no pair
]


def test_tool_writes_pairs_the_trainer_reads_and_reports_every_record(tmp_path):
    src = write_jsonl(tmp_path / "judged.jsonl", GOOD)
    out = str(tmp_path / "out" / "pairs.jsonl")
    report = build_judge_pairs([src], out)
    assert report["records"] == 3 and report["fates"] == {"paired": 2, "no_preference": 1}
    assert report["outputs"] == {"pairs": 2, "ties": 1}
    assert json.load(open(out + ".report.json")) == report
    ds = PreferenceDataset(out)
    assert len(ds) == 2 and ds.record(0)["source"] == "math" and ds.record(1)["source"] == "judge"
    tok = get_tokenizer()
    second = ds.record(1)
    assert second["prompt_ids"].tolist() == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        add_generation_prompt=True)
    assert second["chosen_ids"].tolist() == tok.encode("4") + [tok.im_end_id]
    assert second["rejected_ids"].tolist() == tok.encode("5") + [tok.im_end_id]
    assert os.listdir(tmp_path / "out") == ["pairs.jsonl", "pairs.jsonl.report.json"]  # no temporary files


def test_bad_record_stops_the_run_and_leaves_earlier_output_untouched(tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text("previous run\n")
    src = write_jsonl(tmp_path / "judged.jsonl",
                      GOOD[:1] + [record([S(3, 3, 3), {"accuracy": 9, "style": 1, "detail": 1}])] + GOOD[1:])
    with pytest.raises(RecordError, match=rf"{src}:2: responses\[1\].scores: accuracy: score 9 outside 1-5"):
        build_judge_pairs([src], str(out))
    assert out.read_text() == "previous run\n"
    assert sorted(os.listdir(tmp_path)) == ["judged.jsonl", "pairs.jsonl"]


def test_skip_invalid_counts_and_lists_every_bad_record(tmp_path):
    src = write_jsonl(tmp_path / "judged.jsonl",
                      [GOOD[0], "{not json",
                       {"prompt_ids": [1], "responses": [{"response_ids": [3], "judge_output": ""}]},
                       GOOD[1], "[]"])
    out = str(tmp_path / "pairs.jsonl")
    report = build_judge_pairs([src], out, skip_invalid=True)
    assert report["records"] == 5 and report["fates"] == {"invalid": 3, "paired": 2}
    assert [m.split(": ")[0] for m in report["invalid"]] == [f"{src}:2", f"{src}:3", f"{src}:5"]
    assert "invalid JSON" in report["invalid"][0] and "empty judge output" in report["invalid"][1]
    assert len(PreferenceDataset(out)) == 2


def test_cli_and_tool_wrapper(tmp_path, capsys):
    src = write_jsonl(tmp_path / "judged.jsonl", GOOD)
    out = str(tmp_path / "pairs.jsonl")
    assert main([src, "--output", out, "--weight", "margin", "--pairing", "best_worst"]) == 0
    assert "3 records" in capsys.readouterr().out
    assert [json.loads(line)["weight"] for line in open(out)] == [0.75, 1.0]
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"responses": 3}'])
    assert main([bad, "--output", out]) == 1
    assert f"{bad}:1: responses: expected a list" in capsys.readouterr().err
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_judge_pairs.py"), "--print-template"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and '{"accuracy": <1-5>' in r.stdout
