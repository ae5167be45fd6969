"""Post-training on the trained arithmetic model (session fixture ``arithmetic_model``: pre-trained and
SFT'd by the project's trainer, trained once per session).

* Issue 9's end-to-end acceptance: the SFT model is searched with the Pivotal Token Search tool (the
  task's answer rule as oracle, the trimmed vocabulary as id map), and the single-token pairs it
  writes load into a token-level DPO stage that trains a few steps.
* The post-training rounds (megatron_phi4.demo.posttrain_rounds) for real on a tiny budget: every
  round is a trainer stage chained from the previous one, evaluated, and a second call reuses every
  finished round and evaluation.
"""
import json
from pathlib import Path

import pytest
import torch

import megatron_phi4
from megatron_phi4.demo import arithmetic as A
from megatron_phi4.demo import posttrain_rounds as R
from megatron_phi4.demo.arithmetic_data import read_problems
from megatron_phi4.posttrain.pts_tool import main as pts_main
from tests.distributed_utils import run_distributed

HANG_GUARD_S = 1800  # only against hangs
NUM_QUESTIONS = 40
PTS_OPTIONS = ["--rollouts", "8", "--p-gap", "0.25", "--min-p", "0.1", "--max-p", "0.9", "--max-new-tokens", "160", "--temperature", "0.7",
               "--max-alternatives", "4", "--seed", "3", "--device", "cpu"]


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def pts_run(arithmetic_model, tmp_path_factory):
    """The PTS tool on the SFT model over training-pool questions (never held-out ones)."""
    d = tmp_path_factory.mktemp("pts_arith")
    recs = read_problems(arithmetic_model.data.train_pool_problems)[:NUM_QUESTIONS]
    questions = d / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = d / "pts"
    argv = ["--checkpoint", arithmetic_model.sft_checkpoint, "--questions", str(questions),
            "--oracle", "megatron_phi4.demo.posttrain_rounds:ArithmeticAnswerOracle", "--output", str(out),
            "--id-map", arithmetic_model.vocab_path, *PTS_OPTIONS]
    torch.manual_seed(0)
    assert pts_main(argv, load_model=megatron_phi4.load_model) == 0
    return {"dir": d, "out": out, "questions": recs, "argv": argv}


def test_pts_on_the_sft_model_finds_pivotal_tokens_of_the_worked_steps(arithmetic_model, pts_run):
    vocab = arithmetic_model.vocab
    summary = json.loads((pts_run["out"] / "summary.json").read_text())
    pivots, pairs = _jsonl(pts_run["out"] / "pivotal_tokens.jsonl"), _jsonl(pts_run["out"] / "pairs.jsonl")
    print(f"\nPTS on the SFT model: {summary['questions_by_status']}, {len(pivots)} pivotal tokens, {len(pairs)} "
          f"pairs, {summary['rollouts']} rollouts ({summary['rollouts_per_pivotal_token']} per pivotal token)")
    assert summary["questions_done"] == NUM_QUESTIONS
    assert summary["questions_by_status"].get("searched", 0) >= 1 and len(pivots) >= 1 and len(pairs) >= 1
    queries = {r["id"]: r for r in pts_run["questions"]}
    from megatron_phi4.tokenizer import get_tokenizer
    tok = get_tokenizer()
    for p in pivots:
        q = queries[p["question"]]
        assert p["prompt_ids"][:p["query_len"]] == q["prompt_ids"] and len(p["prompt_ids"]) == p["query_len"] + p["position"]
        assert abs(p["p_after"] - p["p_before"]) >= 0.25 and 0 <= p["token_id"] < vocab.num_used
        # the token as the model's text: the pivot lies inside a worked solution of this very problem
        prefix = vocab.decode(p["prompt_ids"][p["query_len"]:], tok, errors="replace")
        assert p["token_text"] == vocab.decode([p["token_id"]], tok, errors="replace")
        assert "\\boxed{" not in prefix or not prefix.rstrip().endswith("}")  # not past the answer
    # every pair is a verified pivot: chosen raises p, rejected lowers it, single tokens after Q + prefix
    for pair in pairs:
        assert len(pair["chosen_ids"]) == len(pair["rejected_ids"]) == 1 and pair["source"] == "pts"
        assert pair["chosen_ids"] != pair["rejected_ids"]


def _dpo_rank(rank, world, tree):
    from megatron_phi4.demo.arithmetic_run import run_recipe_stages
    return run_recipe_stages(tree)


def test_pts_pairs_train_a_token_level_dpo_stage(arithmetic_model, pts_run):
    from megatron_phi4.data.preference import PreferenceDataset, collate_preference

    m = arithmetic_model
    pairs_path = pts_run["out"] / "pairs.jsonl"
    ds = PreferenceDataset(str(pairs_path), vocab_size=m.vocab.vocab_size)
    batch = collate_preference([ds[i] for i in range(len(ds))], pad_id=m.vocab.pad_id, max_length=256)
    assert batch["loss_mask"].sum().item() == 2 * len(ds)  # one trained position per row: token-level DPO
    budget = R.PostTrainBudget(dpo_steps=4, dpo_global_batch=4, dpo_micro_batch=2, dpo_lr=1e-4)
    run_dir = pts_run["dir"] / "dpo_run"
    tree = R.dpo_stage_tree("pts_dpo", m.sft_checkpoint, str(pairs_path), str(run_dir), R._model_section(m.sft_checkpoint),
                            m.vocab, budget, seed=5)
    run_distributed(_dpo_rank, 1, tree, timeout=HANG_GUARD_S, init_process_group=False)
    final = R._final_checkpoint(run_dir)
    assert final is not None and final.endswith("step_0000004")
    metrics = [r for r in _jsonl(run_dir / "metrics.jsonl") if "dpo/accuracy" in r]
    assert metrics and all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics)
    # the stage moved the weights, starting from the SFT model (its reference)
    from tests.arithmetic_model import load
    a, b = load(m.sft_checkpoint).state_dict(), load(final).state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def _posttrain_rank(rank, world, m, work_dir, budget, method):
    problems = read_problems(m.data.test_problems)[:40]
    rep = R.run_posttraining(m.sft_checkpoint, vocab=m.vocab, data=m.data, work_dir=work_dir, method=method,
                             eval_problems=problems, num_eval=40, budget=budget, seed=11, progress=print)
    return rep


def test_posttraining_rounds_run_real_stages_and_resume(arithmetic_model, tmp_path):
    budget = R.PostTrainBudget(questions_per_round=48, pts_rollouts=8, samples_per_question=4, max_pairs=16,
                               dpo_steps=2, dpo_global_batch=4, dpo_micro_batch=2, eval_batch_size=64)
    work = str(tmp_path / "post")
    rep = run_distributed(_posttrain_rank, 1, arithmetic_model, work, budget, "full_response",
                          timeout=HANG_GUARD_S, init_process_group=False)[0]
    assert [r.name for r in rep.rows] == ["sft", "full_dpo1", "full_dpo2"]
    assert all(r.greedy.total == r.sampled.total == 40 for r in rep.rows)
    ck = [r.checkpoint for r in rep.rows]
    assert ck[0] == str(Path(arithmetic_model.sft_checkpoint).resolve()) and len(set(ck)) == 3
    assert rep.rounds[1]["init"] == ck[1] and all(r["pairs"] >= 1 for r in rep.rounds)
    md = rep.to_markdown()
    assert all(f"| {r.name} |" in md for r in rep.rows)
    stamps = {p: p.stat().st_mtime_ns for p in Path(work).rglob("*") if p.is_file()}
    again = run_distributed(_posttrain_rank, 1, arithmetic_model, work, budget, "full_response",
                            timeout=HANG_GUARD_S, init_process_group=False)[0]
    assert [r.to_dict() for r in again.rows] == [r.to_dict() for r in rep.rows]
    changed = [str(p) for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert changed == [str(Path(work) / "full_response" / "report.json")], changed  # nothing else redone
