"""Refusal data: the paper's SFT / DPO rules (usually right -> answer, usually wrong or bogus ->
"I don't know"; correct > refusal > wrong, responses cut to their first 5 tokens), oracles, and the
tool on good and malformed input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_phi4.data.preference import PreferenceDataset
from megatron_phi4.data.preprocess_chat import validate_messages
from megatron_phi4.posttrain.records import RecordError
from megatron_phi4.posttrain.refusal import (
    DEFAULT_REFUSAL, RefusalOptions, build_refusal_data, examples_from_record, load_oracle, main, normalize_answer,
)
from megatron_phi4.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANSWER = "The capital of Australia is Canberra, which was chosen as a compromise."
WRONG = "The capital of Australia is Sydney, the largest city in the country."


def q(correct_flags, answers=None, **extra):
    answers = answers or [ANSWER if c else WRONG for c in correct_flags]
    return {"question": "What is the capital of Australia?", "answer": ANSWER,
            "samples": [{"text": t, "correct": c} for t, c in zip(answers, correct_flags)], **extra}


def first5(text):
    tok = get_tokenizer()
    return (tok.encode(text) + [tok.im_end_id])[:5]


def run(rec, **opts):
    return examples_from_record(rec, "qa.jsonl:7", RefusalOptions(**opts))


def kinds(sft, pairs):
    return [s["source"] for s in sft], [p["source"] for p in pairs]


@pytest.mark.parametrize("flags,sft_kind,pair_kinds", [
    ([True, True, True, False], ["refusal/answer"], ["refusal/correct>refusal", "refusal/refusal>wrong"]),
    ([True, True, True, True], ["refusal/answer"], ["refusal/correct>refusal"]),
    ([True, False, False, False], ["refusal/refusal"], ["refusal/correct>refusal", "refusal/refusal>wrong"]),
    ([False, False, False], ["refusal/refusal"], ["refusal/refusal>wrong"]),
    ([True, False], [], ["refusal/correct>refusal", "refusal/refusal>wrong"]),  # 0.5: neither usually
])
def test_paper_rules_for_sft_and_dpo(flags, sft_kind, pair_kinds):
    sft, pairs, counts = run(q(flags))
    assert kinds(sft, pairs) == (sft_kind, pair_kinds)
    if not sft_kind:
        assert counts["sft/skipped_uncertain"] == 1
    msgs = [{"role": "user", "content": "What is the capital of Australia?"}]
    for s in sft:
        expected = ANSWER if s["source"] == "refusal/answer" else DEFAULT_REFUSAL
        assert s["messages"] == msgs + [{"role": "assistant", "content": expected}]
        validate_messages(s)  # what tools/preprocess_chat.py accepts
    tok = get_tokenizer()
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    for p in pairs:
        assert p["prompt_ids"] == prompt and p["weight"] == 1.0
        assert len(p["chosen_ids"]) == len(p["rejected_ids"]) == 5  # the paper's first 5 tokens
        if p["source"] == "refusal/correct>refusal":
            assert (p["chosen_ids"], p["rejected_ids"]) == (first5(ANSWER), first5(DEFAULT_REFUSAL))
        else:
            assert (p["chosen_ids"], p["rejected_ids"]) == (first5(DEFAULT_REFUSAL), first5(WRONG))


def test_short_refusal_keeps_its_end_of_turn_and_thresholds_are_options():
    tok = get_tokenizer()
    assert first5(DEFAULT_REFUSAL) == tok.encode(DEFAULT_REFUSAL)  # "I don't know." is 5 tokens: all kept
    _, pairs, _ = run(q([False]), refusal_text="No idea.")
    assert pairs[0]["chosen_ids"] == tok.encode("No idea.") + [tok.im_end_id]  # shorter: end of turn kept
    sft, _, _ = run(q([True, False, False]), answer_above=0.3)  # 1/3 > 0.3 -> answer
    assert kinds(sft, [])[0] == ["refusal/answer"]
    sft, _, _ = run(q([True, True, False]), answer_above=0.7, refuse_below=0.7)  # 2/3 < 0.7 -> refuse
    assert kinds(sft, [])[0] == ["refusal/refusal"]
    _, pairs, _ = run(q([True, False]), response_tokens=2)
    assert all(len(p["chosen_ids"]) == 2 for p in pairs)
    with pytest.raises(ValueError, match="refuse_below"):
        RefusalOptions(answer_above=0.3, refuse_below=0.6).validate()


def test_bogus_questions_get_refusals_and_their_answers_are_wrong():
    sft, pairs, _ = run({"question": "Who was the first person to walk on Mars in 1952?", "bogus": True,
                         "samples": [{"text": "Neil Armstrong"}, {"text": "I am not aware of that.", "correct": True},
                                     {"text": "Yuri Gagarin"}, {"text": "Yuri Gagarin"}]})
    assert kinds(sft, pairs) == (["refusal/bogus_refusal"], ["refusal/refusal>wrong"])
    assert sft[0]["messages"][-1]["content"] == DEFAULT_REFUSAL
    assert pairs[0]["rejected_ids"] == first5("Yuri Gagarin")  # the most frequent wrong answer
    sft, pairs, _ = run({"question": "What colour is the number seven's shadow?", "bogus": True,
                         "refusal": "That question has no answer."})
    assert pairs == [] and sft[0]["messages"][-1]["content"] == "That question has no answer."


def test_most_frequent_wrong_answer_first_seen_among_equals():
    _, pairs, _ = run(q([False, False, False, True], answers=["Perth.", "Sydney.", "Sydney.", ANSWER]))
    assert pairs[1]["rejected_ids"] == first5("Sydney.")
    _, pairs, _ = run(q([False, False], answers=["Perth.", "Sydney."]))
    assert pairs[0]["rejected_ids"] == first5("Perth.")


def test_pairs_identical_after_truncation_are_dropped_and_counted():
    rec = {"question": "Q?", "answer": "I don't know the full list, but it starts with A.",
           "samples": [{"text": "x", "correct": True}]}
    _, pairs, counts = run(rec, response_tokens=3)  # "I", " don't", " know" on both sides
    assert pairs == [] and counts["dpo/skipped_identical_after_truncation"] == 1


def test_oracles_grade_unlabelled_samples():
    rec = {"question": "Capital of Australia?", "answer": "Canberra",
           "samples": [{"text": "canberra!"}, {"text": "It is Canberra."}, {"text": "Sydney", "correct": False}]}
    assert normalize_answer("The  Canberra!") == "canberra"
    _, pairs, counts = examples_from_record(rec, "f:1", RefusalOptions(), load_oracle("exact"))
    assert counts["samples/graded_by_oracle"] == 2
    sft, _, _ = examples_from_record(rec, "f:1", RefusalOptions(), load_oracle("exact"))  # 1/3 right
    assert sft[0]["source"] == "refusal/refusal"
    sft, _, _ = examples_from_record(rec, "f:1", RefusalOptions(), load_oracle("contains"))  # 2/3 right
    assert sft[0]["source"] == "refusal/answer"
    custom = load_oracle("tests.posttrain.test_refusal:always_right")
    sft, pairs, _ = examples_from_record(rec, "f:1", RefusalOptions(), custom)
    assert [p["source"] for p in pairs] == ["refusal/correct>refusal", "refusal/refusal>wrong"]
    with pytest.raises(ValueError, match="oracle"):
        load_oracle("fuzzy")
    with pytest.raises(RecordError, match=r"f:1: samples\[0\]: the oracle returned 'yes', not a bool"):
        examples_from_record(rec, "f:1", RefusalOptions(), lambda r, t: "yes")


def always_right(record, text):
    return text != "Sydney"


@pytest.mark.parametrize("rec,message", [
    ("not an object", "expected a JSON object"),
    ({"answer": "a", "samples": [{"text": "a", "correct": True}]}, "question: expected a non-empty string"),
    ({"question": "Q?", "samples": [{"text": "a", "correct": True}]}, "answer: expected a non-empty string"),
    ({"question": "Q?", "answer": "a"}, "samples: a question needs at least one sampled answer"),
    ({"question": "Q?", "answer": "a", "samples": {"text": "a"}}, "samples: expected a list"),
    ({"question": "Q?", "answer": "a", "samples": [{"text": "a"}]},
     r"samples\[0\].correct: missing, and no oracle was given"),
    ({"question": "Q?", "answer": "a", "samples": [{"text": "a", "correct": "yes"}]},
     r"samples\[0\].correct: expected true or false"),
    ({"question": "Q?", "answer": "a", "samples": [{"text": "", "correct": True}]},
     r"samples\[0\]: text: expected a non-empty string"),
    ({"question": "Q?", "answer": "a", "samples": [{"text": "a", "correct": True, "score": 1}]},
     r"samples\[0\]: unknown field 'score'"),
    ({"question": "Q?", "bogus": "yes", "samples": []}, "bogus: expected true or false"),
    ({"question": "Q?", "bogus": True, "answer": "a"}, "answer: a bogus question has no answer"),
    ({"question": "Q?", "answer": "a", "refusal": 3, "samples": [{"text": "a", "correct": True}]},
     "refusal: expected a non-empty string"),
])
def test_malformed_records_name_file_line_and_field(rec, message):
    with pytest.raises(RecordError, match=f"qa.jsonl:7: {message}"):
        run(rec)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_tool_writes_sft_chat_and_dpo_pairs_and_reports_every_record(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [q([True, True, False]), q([False, False]),
                                               {"question": "Bogus?", "bogus": True}])
    sft_out, dpo_out = str(tmp_path / "sft.jsonl"), str(tmp_path / "dpo.jsonl")
    report = build_refusal_data([src], sft_out, dpo_out)
    assert report["records"] == 3 and report["fates"] == {"used": 3}
    assert report["sft_examples"] == 3 and report["dpo_pairs"] == 3
    assert report["outputs"] == {"sft/answer": 1, "sft/refusal": 1, "sft/bogus_refusal": 1,
                                 "dpo/correct>refusal": 1, "dpo/refusal>wrong": 2}
    for line in open(sft_out):
        validate_messages(json.loads(line))
    ds = PreferenceDataset(dpo_out)
    assert len(ds) == 3 and {ds.record(i)["source"] for i in range(3)} == {"refusal/correct>refusal",
                                                                          "refusal/refusal>wrong"}
    assert json.load(open(sft_out + ".report.json")) == report
    assert sorted(os.listdir(tmp_path)) == ["dpo.jsonl", "qa.jsonl", "sft.jsonl", "sft.jsonl.report.json"]
    only_dpo = build_refusal_data([src], None, str(tmp_path / "d2.jsonl"))
    assert only_dpo["sft_examples"] is None and only_dpo["dpo_pairs"] == 3


def test_bad_record_stops_the_run_or_is_counted_with_skip_invalid(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [q([True]), "{oops", {"question": "Q?", "answer": "a", "samples": []},
                                               q([False])])
    sft_out = tmp_path / "sft.jsonl"
    sft_out.write_text("previous\n")
    with pytest.raises(RecordError, match=f"{src}:2: invalid JSON"):
        build_refusal_data([src], str(sft_out), str(tmp_path / "dpo.jsonl"))
    assert sft_out.read_text() == "previous\n" and not (tmp_path / "dpo.jsonl").exists()
    report = build_refusal_data([src], str(sft_out), str(tmp_path / "dpo.jsonl"), skip_invalid=True)
    assert report["records"] == 4 and report["fates"] == {"used": 2, "invalid": 2}
    assert report["invalid"][0].startswith(f"{src}:2: invalid JSON")
    assert report["invalid"][1].startswith(f"{src}:3: samples: a question needs")
    assert report["sft_examples"] == 2


def test_cli_and_tool_wrapper(tmp_path, capsys):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4",
                                                "samples": [{"text": "4"}, {"text": "5"}, {"text": "4"}]}])
    sft_out = str(tmp_path / "sft.jsonl")
    assert main([src, "--sft-output", sft_out, "--oracle", "exact"]) == 0
    assert "1 SFT examples" in capsys.readouterr().out
    assert json.loads(open(sft_out).readline())["messages"][-1]["content"] == "4"
    assert main([src, "--sft-output", sft_out]) == 1
    assert f"{src}:1: samples[0].correct: missing" in capsys.readouterr().err
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_refusal_data.py"), src,
                        "--dpo-output", str(tmp_path / "dpo.jsonl"), "--oracle", "contains"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 DPO pairs" in r.stdout
