"""The round logic of megatron_phi4.demo.posttrain_rounds, without training: the oracle, the rule-based
judge (including malformed responses), pair construction for the judge and full-response rounds,
budget equality of the two methods, and resume (finished rounds and evaluations are reused)."""
import json
from pathlib import Path

import pytest

from megatron_phi4.demo import arithmetic as A
from megatron_phi4.demo import posttrain_rounds as R
from megatron_phi4.demo.evaluate import Accuracy
from megatron_phi4.fileio import atomic_write_json
from megatron_phi4.posttrain.judge import JudgePairOptions, build_judge_pairs, parse_judge_scores

P = A.Problem(482, "+", 379)  # 861
GOOD = A.worked_solution(P)
WRONG_ANSWER = GOOD.replace("\\boxed{861}", "\\boxed{851}")
WRONG_STEP = GOOD.replace("tens: 8 + 7 + 1 = 16, write 6 carry 1", "tens: 8 + 7 + 1 = 15, write 5 carry 1")


def test_oracle_is_the_task_answer_rule():
    o = R.ArithmeticAnswerOracle()
    assert o.check(GOOD, "861").passed and o.check(GOOD, " 861 ").extracted == "861"
    assert not o.check(WRONG_ANSWER, "861").passed
    assert not o.check("the answer is 861", "861").passed  # no box: the task's rule, not the numeric oracle's
    assert not o.check("\\boxed{8610}", "861").passed and not o.check("\\boxed{86}", "861").passed
    assert not o.check("\\boxed{+861}", "861").passed  # a whole integer -?[0-9]+, nothing else
    assert not o.check("\\boxed{861}\n\\boxed{86}", "861").passed  # the last box answers
    with pytest.raises(ValueError, match="expected an integer"):
        o.check(GOOD, "eight hundred")
    assert [r.passed for r in o.check_many([GOOD, WRONG_ANSWER], "861")] == [True, False]


def test_rule_judge_scores_correct_wrong_and_sloppy_responses():
    assert R.rule_judge(GOOD, P) == R.JudgeScores(5, 5, 5)
    wrong = R.rule_judge(WRONG_ANSWER, P)
    assert wrong.accuracy == 2 and wrong.detail == 5  # steps right, final answer wrong
    step = R.rule_judge(WRONG_STEP, P)
    assert step.accuracy == 5 and step.detail < 5  # right answer by luck is still less detailed
    padded = R.rule_judge(GOOD + "\nI hope this helps!\nI hope this helps!", P)
    assert padded.accuracy == 5 and padded.style < 5
    no_steps = R.rule_judge("\\boxed{861}", P)
    assert no_steps.accuracy == 5 and no_steps.detail == 1


@pytest.mark.parametrize("text", ["", "   \n ", "\ufffd\ufffd\ufffd", "482 = 4 8 2\nones: 2 + 9", "\\boxed{",
                                  "\\boxed{8 6 1}", "\\boxed{861.0}", "\\boxed{}" * 3])
def test_rule_judge_on_malformed_responses_gives_low_scores_not_errors(text):
    s = R.rule_judge(text, P)
    assert s.accuracy == 1 and s.style <= 4 and 1 <= s.detail <= 5
    assert parse_judge_scores(R.judge_output(text, P)) == s  # the judge's output parses back


def test_rule_judge_refuses_a_non_string():
    with pytest.raises(TypeError, match="text must be a str"):
        R.rule_judge(None, P)


def _sampled(texts, ids=None):
    ids = ids or [[10 + i, 20 + i, 30] for i in range(len(texts))]
    return {"id": "q", "prompt_ids": [1, 2, 3], "reference": str(P.answer), "problem": P.to_json(),
            "responses": [{"response_ids": i, "text": t, "correct": A.is_correct(t, P.answer)}
                          for i, t in zip(ids, texts)]}


def test_judge_pairs_follow_the_paper_rule_through_the_project_tool(tmp_path):
    s = _sampled([WRONG_ANSWER, GOOD, "\\boxed{", GOOD + "\nI hope this helps!\nI hope this helps!"])
    judged = tmp_path / "judged.jsonl"
    judged.write_text(json.dumps(R.judged_record(s)) + "\n")
    report = build_judge_pairs([str(judged)], str(tmp_path / "pairs.jsonl"), JudgePairOptions())
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    ids = [r["response_ids"] for r in s["responses"]]
    got = {(tuple(p["chosen_ids"]), tuple(p["rejected_ids"])) for p in pairs}
    # correct beats wrong (accuracy), the clean correct one beats the padded one (mean), wrong-with-box
    # beats no answer (accuracy 2 > 1): all 6 combinations are decided
    want = {(1, 0), (1, 2), (1, 3), (3, 0), (3, 2), (0, 2)}
    assert got == {(tuple(ids[a]), tuple(ids[b])) for a, b in want}
    assert report["outputs"]["pairs"] == 6 and all(p["prompt_ids"] == [1, 2, 3] for p in pairs)


def test_full_response_pairs_are_correct_against_incorrect():
    s = _sampled([WRONG_ANSWER, GOOD, "\\boxed{", GOOD])
    pairs = R.full_response_pairs(s)
    ids = [r["response_ids"] for r in s["responses"]]
    assert [(p["chosen_ids"], p["rejected_ids"]) for p in pairs] == [(ids[1], ids[0]), (ids[3], ids[2])]
    assert all(p["source"] == "full_response" and p["prompt_ids"] == [1, 2, 3] for p in pairs)
    assert R.full_response_pairs(_sampled([GOOD, GOOD])) == []
    assert R.full_response_pairs(_sampled([WRONG_ANSWER, "\\boxed{1}"])) == []
    # an identical chosen and rejected response is no pair
    assert R.full_response_pairs(_sampled([GOOD, WRONG_ANSWER], ids=[[5], [5]])) == []


def test_cap_pairs_is_a_seeded_subset_in_order():
    pairs = [{"i": i} for i in range(50)]
    a, b = R.cap_pairs(pairs, 10, 7), R.cap_pairs(pairs, 10, 7)
    assert a == b and len(a) == 10 and [p["i"] for p in a] == sorted(p["i"] for p in a)
    assert R.cap_pairs(pairs, 10, 8) != a and R.cap_pairs(pairs, 60, 7) == pairs


class _Vocab:
    pad_id, eod_id = 7, 8


def _strip(tree):
    t = json.loads(json.dumps(tree))
    for k in ("name", "run_dir"):
        t.pop(k)
    st = t["stages"][0]
    st.pop("init_from"), st["data"].pop("paths")
    return t


def test_both_methods_get_the_same_training_budget():
    from megatron_phi4.config import RecipeConfig, from_dict

    b = R.PostTrainBudget(dpo_steps=12, dpo_global_batch=8, dpo_micro_batch=4, dpo_lr=3e-5)
    model = {"vocab_size": 128, "hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1,
             "intermediate_size": 64, "max_seq_length": 512}
    trees = {name: R.dpo_stage_tree(name, f"/ckpt/{name}", f"/p/{name}.jsonl", f"/run/{name}", model, _Vocab(), b, 3)
             for m in R.METHODS for name, _ in R.ROUNDS[m]}
    assert len(trees) == 4 and [len(R.ROUNDS[m]) for m in R.METHODS] == [2, 2]
    stripped = [_strip(t) for t in trees.values()]
    assert all(s == stripped[0] for s in stripped)
    st = trees["dpo1"]["stages"][0]
    assert st["train_steps"] == 12 and st["data"]["global_batch_size"] == 8 and st["optim"]["lr"] == 3e-5
    assert st["loss"]["type"] == "dpo" and st["data"]["pad_id"] == 7 and b.pairs_trained_per_round == 96
    assert st["loss"]["dpo_sft_weight"] == 0.0
    sft = R.dpo_stage_tree("dpo1", "/c", "/p.jsonl", "/r", model, _Vocab(), R.PostTrainBudget(dpo_sft_weight=0.5), 3)
    assert from_dict(RecipeConfig, sft).validate(1).stages[0].loss.dpo_sft_weight == 0.5
    recipe = from_dict(RecipeConfig, trees["full_dpo2"]).validate(1)
    assert recipe.stages[0].num_steps() == 12 and recipe.stages[0].init_from == "/ckpt/full_dpo2"


@pytest.mark.parametrize("kw, match", [(dict(dpo_steps=0), "dpo_steps"), (dict(dpo_lr=-1.0), "dpo_lr"),
                                       (dict(dpo_global_batch=12, dpo_micro_batch=8), "dpo_global_batch"),
                                       (dict(pts_p_gap=1.5), "pts_p_gap"), (dict(dpo_sft_weight=-0.5), "dpo_sft_weight"),
                                       (dict(dpo_sft_weight=float("nan")), "dpo_sft_weight")])
def test_bad_budget_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        R.PostTrainBudget(**kw)


# ------------------------------------------------------------------------------------- resume
def _problem_record(i, split, p):
    return {"id": f"{split}-{i}", "prompt_ids": [1, 2, 3 + i], "reference": str(p.answer),
            "meta": {"split": split, "question": p.question, "problem": p.to_json()}}


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """run_posttraining with the expensive parts (generation, PTS, training, evaluation) replaced by
    stand-ins that record their calls; the rounds' own logic (questions, pairs, files) is real."""
    from megatron_phi4.demo.arithmetic_data import ArithmeticData

    test = A.sample_problems("test", 6, 0)
    pool = A.sample_problems("train", 8, 0)
    root = tmp_path / "data"
    root.mkdir()
    (root / "test.jsonl").write_text("".join(json.dumps(_problem_record(i, "test", p)) + "\n" for i, p in enumerate(test)))
    (root / "pool.jsonl").write_text("".join(json.dumps(_problem_record(i, "train", p)) + "\n" for i, p in enumerate(pool)))
    data = ArithmeticData(root=str(root), vocab_path=str(root / "vocab.json"), pretrain_mixture="", pretrain_validation="",
                          sft_train="", sft_valid="", test_problems=str(root / "test.jsonl"), validation_problems="",
                          train_pool_problems=str(root / "pool.jsonl"), manifest="")
    calls = {"evaluate": [], "sample": [], "pts": [], "train": []}

    def evaluate(name, checkpoint, problems, vocab, budget, seed, eval_dir, progress, pairs=None):
        calls["evaluate"].append(name)
        key = {"checkpoint": checkpoint}
        path = eval_dir / f"{name}.json"
        if path.is_file() and json.loads(path.read_text())["key"] == key:
            return R.ModelRow(name, checkpoint, Accuracy.of(1, 2), Accuracy.of(1, 2), pairs)
        calls["evaluate"].append(f"computed {name}")
        atomic_write_json(path, {"key": key})
        return R.ModelRow(name, checkpoint, Accuracy.of(1, 2), Accuracy.of(1, 2), pairs)

    def sample(checkpoint, questions, vocab, path, budget, seed, progress, batch_questions=16):
        calls["sample"].append(Path(path).parent.name)
        texts = [A.worked_solution(A.Problem(**q["meta"]["problem"])) for q in questions]
        recs = [{"id": q["id"], "prompt_ids": q["prompt_ids"], "reference": q["reference"],
                 "problem": q["meta"]["problem"],
                 "responses": [{"response_ids": [40, 41], "text": t, "correct": True},
                               {"response_ids": [42], "text": "\\boxed{0}", "correct": False}]}
                for q, t in zip(questions, texts)]
        R._write_jsonl(Path(path), recs)
        return recs

    def pts(checkpoint, questions_path, vocab_path, out_dir, budget, seed):
        calls["pts"].append(str(checkpoint))
        qs = R._read_jsonl(Path(questions_path))
        R._write_jsonl(Path(out_dir) / "pairs.jsonl", [{"prompt_ids": q["prompt_ids"] + [9], "chosen_ids": [4],
                                                        "rejected_ids": [5], "source": "pts"} for q in qs])
        return {"questions_by_status": {"searched": len(qs)}, "pivotal_tokens": len(qs), "rollouts": 10}

    def train(name, init, pairs_path, run_dir, vocab, budget, seed, progress):
        final = Path(run_dir) / "final"
        if final.is_file():
            return final.read_text()
        calls["train"].append((name, str(init), len(R._read_jsonl(Path(pairs_path)))))
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_text(f"/ckpt/{name}")
        return f"/ckpt/{name}"

    monkeypatch.setattr(R, "_evaluate", evaluate)
    monkeypatch.setattr(R, "sample_round", sample)
    monkeypatch.setattr(R, "_pts_pairs", pts)
    monkeypatch.setattr(R, "_train_round", train)
    budget = R.PostTrainBudget(questions_per_round=3, max_pairs=2)

    def run(method, **kw):
        kw.setdefault("budget", budget)
        return R.run_posttraining(str(tmp_path / "sft"), vocab=_Vocab(), data=data, work_dir=str(tmp_path / "work"),
                                  method=method, num_eval=6, progress=lambda s: None, **kw)
    return run, calls, tmp_path


def test_rounds_chain_their_checkpoints_and_cap_pairs(fake_run):
    run, calls, tmp = fake_run
    rep = run("pts_judge")
    assert [r.name for r in rep.rows] == ["sft", "dpo1", "dpo2"]
    sft = str((tmp / "sft").resolve())
    assert calls["pts"] == [sft] and calls["sample"] == ["dpo2"]
    assert calls["train"] == [("dpo1", sft, 2), ("dpo2", "/ckpt/dpo1", 2)]  # capped at max_pairs=2
    assert [r.checkpoint for r in rep.rows] == [sft, "/ckpt/dpo1", "/ckpt/dpo2"]
    md = rep.to_markdown()
    assert md.count("\n") == 5 and "| dpo2 | 2 | 50.0% [" in md
    # round questions: disjoint slices of the pool, none held out
    q1 = R._read_jsonl(tmp / "work/pts_judge/dpo1/questions.jsonl")
    q2 = R._read_jsonl(tmp / "work/pts_judge/dpo2/questions.jsonl")
    assert [q["id"] for q in q1] == ["train-0", "train-1", "train-2"] and [q["id"] for q in q2] == ["train-3", "train-4", "train-5"]
    full = run("full_response")
    assert [r.name for r in full.rows] == ["sft", "full_dpo1", "full_dpo2"]
    assert calls["sample"] == ["dpo2", "full_dpo1", "full_dpo2"]
    assert calls["train"][2:] == [("full_dpo1", sft, 2), ("full_dpo2", "/ckpt/full_dpo1", 2)]
    assert calls["evaluate"].count("computed sft") == 1  # the SFT row is shared by both methods


def test_resume_reuses_finished_rounds_and_refuses_other_settings(fake_run):
    run, calls, tmp = fake_run
    run("pts_judge")
    before = {k: list(v) for k, v in calls.items()}
    rep = run("pts_judge")
    assert calls["pts"] == before["pts"] and calls["sample"] == before["sample"] and calls["train"] == before["train"]
    assert not [c for c in calls["evaluate"][len(before["evaluate"]):] if c.startswith("computed")]
    assert [r.checkpoint for r in rep.rows][1:] == ["/ckpt/dpo1", "/ckpt/dpo2"]
    # an interrupted round 2 (pairs written, training not finished) resumes from there
    (tmp / "work/pts_judge/dpo2/run/final").unlink()
    run("pts_judge")
    assert calls["sample"] == before["sample"] and calls["train"][-1] == ("dpo2", "/ckpt/dpo1", 2)
    with pytest.raises(ValueError, match="budget="):
        run("pts_judge", budget=R.PostTrainBudget(questions_per_round=3, max_pairs=3))
    # a work dir written before a budget field existed: the field's default is what that run used
    settings = tmp / "work/pts_judge/settings.json"
    old = json.loads(settings.read_text())
    del old["budget"]["dpo_sft_weight"]
    settings.write_text(json.dumps(old))
    run("pts_judge")
    with pytest.raises(ValueError, match="dpo_sft_weight"):
        run("pts_judge", budget=R.PostTrainBudget(questions_per_round=3, max_pairs=2, dpo_sft_weight=1.0))


def test_bad_arguments_fail_before_any_work(fake_run):
    run, calls, tmp = fake_run
    with pytest.raises(ValueError, match="method: got 'ppo'"):
        run("ppo")
    with pytest.raises(ValueError, match="2 x questions_per_round = 10"):
        run("pts_judge", budget=R.PostTrainBudget(questions_per_round=5))
    assert not any(calls.values()) and not (tmp / "work").exists()


def test_sampling_resumes_after_a_torn_line(tmp_path, monkeypatch):
    """sample_round appends one line per question; a killed run's torn last line is dropped and only
    the questions without a complete line are sampled again."""
    import megatron_phi4.api
    import megatron_phi4.generation
    from megatron_phi4.generation.decoding import Sample

    class Vocab:
        stop_token_ids = [0]

        def decode(self, ids, tok=None, errors="replace"):
            return "\\boxed{" + "".join(str(i) for i in ids) + "}"

    asked = []

    def generate(model, prompts, **kw):
        asked.append(len(prompts))
        return [[Sample([7, 0], [0.0, 0.0], "stop")] * kw["num_samples"] for _ in prompts]

    monkeypatch.setattr(megatron_phi4.generation, "generate", generate, raising=False)
    monkeypatch.setattr(megatron_phi4.api, "load_model", lambda ckpt: None)
    qs = [_problem_record(i, "train", A.Problem(7, "x", 1)) for i in range(5)]
    path = tmp_path / "samples.jsonl"
    b = R.PostTrainBudget(samples_per_question=2)
    first = R.sample_round("ckpt", qs[:3], Vocab(), path, b, 1, lambda s: None, batch_questions=2)
    assert asked == [2, 1] and all(r["responses"][0]["correct"] for r in first)  # "\boxed{7}" answers 7 x 1
    with open(path, "a") as f:
        f.write('{"id": "train-3", "prom')
    recs = R.sample_round("ckpt", qs, Vocab(), path, b, 1, lambda s: None, batch_questions=2)
    assert asked == [2, 1, 2] and [r["id"] for r in recs] == [q["id"] for q in qs]
    assert len(path.read_text().splitlines()) == 5 and recs[:3] == first
    assert [r["id"] for r in R._read_jsonl(path)] == [q["id"] for q in qs]  # the file itself is whole again
