"""Post-training rounds on the arithmetic demo: does PTS + DPO make the SFT model better at the task?

:func:`run_posttraining` takes the demo's SFT checkpoint and runs two DPO rounds, each a real stage
of the project's Trainer, evaluating every model on held-out problems (greedy and sampled at
temperature 0.7, 95% Wilson intervals):

``method="pts_judge"`` (Phi-4's recipe, report section 4):
  * ``dpo1``: Pivotal Token Search on the SFT model (the project's tool,
    :mod:`megatron_phi4.posttrain.pts_tool`, with :class:`ArithmeticAnswerOracle`: the task's own
    answer rule) over the round's training-split questions; its single-token pairs train a
    token-level DPO stage (prompt = question + prefix, one-token completions);
  * ``dpo2``: responses sampled from ``dpo1`` are scored by a **rule-based judge**
    (:func:`rule_judge`; no language model): accuracy from the verified answer, style and detail
    from rule checks of the worked steps against the reference solution. Its judge output goes
    through the project's judge parser and pairing rule (``tools/build_judge_pairs.py``: higher
    accuracy, else higher mean) into a full-response DPO stage.

``method="full_response"`` (the baseline the report argues against): in both rounds, one correct
and one incorrect sampled response of the same prompt make a pair (``full_dpo1`` from the SFT
model, ``full_dpo2`` from ``full_dpo1``).

The budget (:class:`PostTrainBudget`) is the same for both methods: every round draws on the same
``questions_per_round`` training-pool problems (round k: pool slice k), keeps at most
``max_pairs`` distinct pairs, and trains ``dpo_steps`` optimizer steps of ``dpo_global_batch``
pairs at the same learning rate, beta, loss and sequence length (:func:`dpo_stage_tree` differs
between the methods only in names and paths; the tests check this). What differs is what a pair
is made of -- one pivotal token (PTS) or whole responses -- and how the pairs are found: PTS spends
``pts_rollouts`` rollouts per p estimate, sampling spends ``samples_per_question`` per question.

Resumable: everything lives under ``work_dir`` (``eval/`` -- one JSON per evaluated model, reused
when its checkpoint, problems and settings match; ``<method>/<round>/`` -- the questions, the PTS
output (the tool's own resumable journal) or the sampled responses (one line per question,
appended as each batch finishes), the pairs, and the DPO run, which the Trainer resumes from its
latest checkpoint and which is reused once its final checkpoint exists). ``<method>/settings.json``
refuses a rerun with another SFT checkpoint, budget or seed, naming the field.

This module sits at the top of the import order (the demo package): it uses the generation,
oracles, PTS, judge and training packages, and nothing in the library imports it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from megatron_phi4.demo import arithmetic as task
from megatron_phi4.demo.arithmetic_data import read_problems
from megatron_phi4.demo.evaluate import Accuracy, evaluate_accuracy
from megatron_phi4.fileio import atomic_write_json, atomic_write_text
from megatron_phi4.posttrain.judge import JudgeScores
from megatron_phi4.posttrain.oracles.base import Oracle, OracleResult, require_str

__all__ = ["PostTrainBudget", "ModelRow", "PostTrainReport", "run_posttraining", "ArithmeticAnswerOracle",
           "rule_judge", "judge_output", "judged_record", "full_response_pairs", "cap_pairs", "dpo_stage_tree",
           "METHODS", "ROUNDS"]

METHODS = ("pts_judge", "full_response")
# (model name, how its pairs are made) per round
ROUNDS = {"pts_judge": (("dpo1", "pts"), ("dpo2", "judge")),
          "full_response": (("full_dpo1", "full"), ("full_dpo2", "full"))}
EVAL_TEMPERATURE = 0.7


OPTIONAL_ZERO = ("dpo_sft_weight",)  # float fields where 0 means "off"


@dataclass(frozen=True)
class PostTrainBudget:
    """What each round may spend; identical for both methods (see the module docstring)."""

    questions_per_round: int = 400     # training-pool problems per round (round k: pool slice k)
    pts_rollouts: int = 16             # rollouts per p(success) estimate (PTS)
    pts_p_gap: float = 0.2             # PTS pivot threshold (the report's illustration)
    # Rollouts and round samples at the evaluation's sampling temperature: at 1.0 the tiny SFT model
    # is right too rarely for p(success) to fall in PTS's [0.2, 0.8] window or for a correct sample
    pts_temperature: float = 0.7
    samples_per_question: int = 4      # sampled responses per question (judge / full-response rounds)
    sample_temperature: float = 0.7
    max_new_tokens: int = 160          # longest response (a worked solution is ~60-110 tokens)
    max_pairs: int = 256               # distinct pairs a round keeps at most
    dpo_steps: int = 16                # optimizer steps per round
    dpo_global_batch: int = 16         # pairs per step
    dpo_micro_batch: int = 8
    dpo_seq_length: int = 256
    dpo_lr: float = 2e-5
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    dpo_sft_weight: float = 0.0        # > 0: + TRL's "sft" term (NLL of the chosen completions)
    eval_max_new_tokens: int = 160
    eval_batch_size: int = 128

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"PostTrainBudget.{f.name}: expected an int >= 1, got {v!r}")
            if f.type == "float" and f.name in OPTIONAL_ZERO:
                if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                    raise ValueError(f"PostTrainBudget.{f.name}: expected a finite number >= 0, got {v!r}")
            elif f.type == "float" and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"PostTrainBudget.{f.name}: expected a number > 0, got {v!r}")
        if self.pts_p_gap > 1:
            raise ValueError(f"PostTrainBudget.pts_p_gap: expected a number in (0, 1], got {self.pts_p_gap}")
        if self.dpo_global_batch % self.dpo_micro_batch:
            raise ValueError(f"PostTrainBudget.dpo_global_batch: {self.dpo_global_batch} is not a multiple of "
                             f"dpo_micro_batch={self.dpo_micro_batch}")

    @property
    def pairs_trained_per_round(self) -> int:
        """Pair presentations per round (``dpo_steps x dpo_global_batch``), the same for both methods."""
        return self.dpo_steps * self.dpo_global_batch


@dataclass
class ModelRow:
    """One evaluated model."""

    name: str
    checkpoint: str
    greedy: Accuracy
    sampled: Accuracy
    pairs: Optional[int] = None  # distinct pairs of the round that produced it (None: SFT)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PostTrainReport:
    method: str
    rows: List[ModelRow]
    num_eval: int
    budget: PostTrainBudget
    rounds: List[dict] = field(default_factory=list)  # per round: name, source, pairs, what it spent
    wall_s: float = 0.0

    def to_markdown(self) -> str:
        head = ("| model | pairs | greedy accuracy [95% CI] | sampled T=0.7 accuracy [95% CI] | checkpoint |\n"
                "|---|---|---|---|---|\n")
        lines = [f"| {r.name} | {'-' if r.pairs is None else r.pairs} | {_fmt(r.greedy)} | {_fmt(r.sampled)} | "
                 f"`{r.checkpoint}` |" for r in self.rows]
        return head + "\n".join(lines) + "\n"


def _fmt(a: Accuracy) -> str:
    return f"{100 * a.rate:.1f}% [{100 * a.low:.1f}, {100 * a.high:.1f}] ({a.correct}/{a.total})"


# ------------------------------------------------------------------------------------- the oracle
_INT = re.compile(r"-?[0-9]+")


class ArithmeticAnswerOracle(Oracle):
    """The task's answer rule (:func:`megatron_phi4.demo.arithmetic.is_correct`: the last
    ``\\boxed{}`` holds the exact integer) as an oracle for the PTS tool -- the same rule the
    evaluation applies, so PTS optimises what is measured."""

    name = "arithmetic"

    def parse_reference(self, reference) -> int:
        reference = require_str(reference, "reference").strip()
        if not _INT.fullmatch(reference):
            raise ValueError(f"expected an integer, got {reference!r}")
        return int(reference)

    def check(self, candidate: str, reference: str) -> OracleResult:
        want = self.parse_reference(reference)
        got = task.extract_answer(require_str(candidate, "candidate"))
        if got is None:
            return OracleResult(False, "no \\boxed{integer} answer")
        return OracleResult(got == want, "correct" if got == want else f"answered {got}, expected {want}",
                            extracted=str(got))


# ------------------------------------------------------------------------------ the rule-based judge
def rule_judge(text, problem: task.Problem) -> JudgeScores:
    """Scores 1-5 for one response to ``problem``, by rules (no language model):

    * accuracy: 5 if the answer is right by the task's rule; 2 if a boxed integer is wrong; 1 if
      there is no readable answer;
    * detail: how many of the reference solution's worked lines (operands spelled, one line per
      column, the result digits) appear verbatim: 1 + round(4 x fraction);
    * style: 5, minus one for each of: lines that are not reference lines (more than one), no
      box, text after the last box, longer than 1.5x the reference, a line repeated; at least 1.

    Malformed text (empty, cut off, unmapped ids decoded as U+FFFD) gets low scores, never an
    error; a ``text`` that is not a string is the caller's bug (TypeError)."""
    if not isinstance(text, str):
        raise TypeError(f"rule_judge: text must be a str, got {type(text).__name__}")
    ref_lines = task.worked_solution(problem).split("\n")
    steps = ref_lines[:-1]  # all but the boxed answer
    lines = [ln.strip() for ln in text.strip().split("\n") if ln.strip()]
    got = task.extract_answer(text)
    accuracy = 5 if got == problem.answer else (2 if got is not None else 1)
    present = sum(1 for s in steps if s in lines)
    detail = 1 + round(4 * present / len(steps))
    boxed_last = bool(lines) and lines[-1] == f"\\boxed{{{got}}}" if got is not None else False
    extra = sum(1 for ln in lines if ln not in ref_lines)
    faults = [extra > 1, got is None, got is not None and not boxed_last,
              len(text) > 1.5 * len("\n".join(ref_lines)), len(set(lines)) < len(lines)]
    style = max(1, 5 - sum(faults))
    return JudgeScores(accuracy=accuracy, style=style, detail=detail)


def judge_output(text, problem: task.Problem) -> str:
    """What the rule-based judge "says": a short reason and the JSON score line that
    :data:`~megatron_phi4.posttrain.judge.JUDGE_PROMPT_TEMPLATE` asks a judge to end with."""
    s = rule_judge(text, problem)
    return (f"Rule-based judge: answer checked against {problem.answer}; worked steps compared with the "
            f"reference solution.\n" + json.dumps({"accuracy": s.accuracy, "style": s.style, "detail": s.detail}))


def judged_record(sampled: dict) -> dict:
    """A ``tools/build_judge_pairs.py`` input record from one question's sampled responses (the
    responses as token ids, each with the rule-based judge's raw output)."""
    problem = task.Problem(**sampled["problem"])
    return {"prompt_ids": sampled["prompt_ids"], "source": "judge",
            "responses": [{"response_ids": r["response_ids"], "judge_output": judge_output(r["text"], problem)}
                          for r in sampled["responses"]]}


def full_response_pairs(sampled: dict) -> List[dict]:
    """The baseline's pairs for one question: its i-th correct response against its i-th incorrect
    one (as many pairs as the smaller group; none when all are right or all wrong)."""
    good = [r for r in sampled["responses"] if r["correct"]]
    bad = [r for r in sampled["responses"] if not r["correct"]]
    return [{"prompt_ids": sampled["prompt_ids"], "chosen_ids": g["response_ids"], "rejected_ids": b["response_ids"],
             "source": "full_response"} for g, b in zip(good, bad) if g["response_ids"] != b["response_ids"]]


def cap_pairs(pairs: Sequence[dict], max_pairs: int, seed: int) -> List[dict]:
    """At most ``max_pairs`` pairs: a seeded random subset, in the original order."""
    if len(pairs) <= max_pairs:
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), max_pairs))
    return [pairs[i] for i in keep]


# ------------------------------------------------------------------------------------ small helpers
def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def _stable_seed(*parts) -> int:
    return int(_digest(parts), 16) >> 2


def _write_jsonl(path: Path, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _read_jsonl(path: Path) -> List[dict]:
    """Complete lines only (a torn last line from a killed append is ignored and redone)."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


# ---------------------------------------------------------------------------------- the DPO stage
def dpo_stage_tree(name: str, init_checkpoint: str, pairs_path: str, run_dir: str, model: dict, vocab,
                   budget: PostTrainBudget, seed: int) -> dict:
    """The recipe of one round: a single ``dpo`` stage starting from ``init_checkpoint`` (the
    frozen reference is that checkpoint too), trained on ``pairs_path``. Everything but the names
    and paths comes from ``budget``, so both methods train alike."""
    steps = budget.dpo_steps
    return {
        "name": f"arithmetic_{name}", "run_dir": str(run_dir), "seed": int(seed), "model": dict(model),
        "parallel": {"tp": 1, "pp": 1, "dp": -1},
        "checkpoint": {"interval": max(1, steps // 2), "keep_last": 1},
        # TensorBoard beside metrics.jsonl, so `tensorboard --logdir <work dir>` shows the DPO rounds
        # (loss, reward margin, implicit-reward accuracy) next to pre-training and SFT
        "logging": {"log_interval": max(1, steps // 8), "tensorboard": True},
        "stages": [{
            "name": "dpo", "train_steps": steps, "init_from": str(init_checkpoint),
            "data": {"kind": "preference", "paths": [str(pairs_path)], "seq_length": budget.dpo_seq_length,
                     "micro_batch_size": budget.dpo_micro_batch, "global_batch_size": budget.dpo_global_batch,
                     "seed": int(seed), "pad_id": vocab.pad_id, "eod_id": vocab.eod_id},
            "optim": {"lr": budget.dpo_lr, "min_lr": budget.dpo_lr, "weight_decay": 0.0, "warmup_steps": 0,
                      "decay_style": "constant", "clip_grad": 1.0},
            "loss": {"type": "dpo", "dpo_beta": budget.dpo_beta, "dpo_loss_type": budget.dpo_loss_type,
                     "dpo_sft_weight": budget.dpo_sft_weight},
        }],
    }


def _final_checkpoint(run_dir: Path) -> Optional[str]:
    from megatron_phi4.checkpoint.manager import CheckpointManager, has_checkpoints, read_trainer_state

    root = run_dir / "checkpoints"
    if not has_checkpoints(root):
        return None
    latest = CheckpointManager(root).latest()
    if latest is None:
        return None
    final = CheckpointManager(root, run_id=read_trainer_state(latest).get("run_id")).stage_final("dpo")
    return None if final is None else str(final)


def _model_section(checkpoint: str) -> dict:
    from megatron_phi4.checkpoint import format as ckpt_format
    cfg = ckpt_format.model_config_from_meta(ckpt_format.read_meta(ckpt_format.resolve_checkpoint(checkpoint)))
    return asdict(cfg)


def _train_round(name: str, init_checkpoint: str, pairs_path: Path, run_dir: Path, vocab, budget, seed,
                 progress) -> str:
    done = _final_checkpoint(run_dir)
    if done is not None:
        progress(f"[posttrain] {name}: DPO stage already finished ({done})")
        return done
    from megatron_phi4.demo.arithmetic_run import run_recipe_stages
    tree = dpo_stage_tree(name, init_checkpoint, str(pairs_path), str(run_dir), _model_section(init_checkpoint),
                          vocab, budget, seed)
    progress(f"[posttrain] {name}: DPO stage, {budget.dpo_steps} steps x {budget.dpo_global_batch} pairs from "
             f"{init_checkpoint}")
    run_recipe_stages(tree)
    done = _final_checkpoint(run_dir)
    if done is None:
        raise RuntimeError(f"{run_dir}: the DPO stage of {name} stopped before its last step; call again to resume")
    return done


# ------------------------------------------------------------------------------- pair construction
def _load(checkpoint: str):
    import torch

    from megatron_phi4.api import load_model
    torch.manual_seed(0)
    return load_model(checkpoint)


def sample_round(checkpoint: str, questions: Sequence[dict], vocab, path: Path, budget: PostTrainBudget,
                 seed: int, progress, batch_questions: int = 16) -> List[dict]:
    """``samples_per_question`` responses per question from ``checkpoint``, each checked by the
    answer rule; one JSONL line per question, appended (and fsynced) batch by batch, so a killed
    run redoes at most one batch. Seeds depend on (seed, question id) only."""
    from megatron_phi4.generation import generate
    from megatron_phi4.tokenizer import get_tokenizer

    done = {r["id"]: r for r in _read_jsonl(path)}
    if path.is_file() and len(path.read_text().splitlines()) != len(done):
        _write_jsonl(path, done.values())  # drop a torn last line before appending
    todo = [q for q in questions if q["id"] not in done]
    if not todo:
        return [done[q["id"]] for q in questions]
    model, tok = _load(checkpoint), get_tokenizer()
    stop = list(vocab.stop_token_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for start in range(0, len(todo), batch_questions):
        batch = todo[start:start + batch_questions]
        outs = generate(model, [q["prompt_ids"] for q in batch], max_new_tokens=budget.max_new_tokens,
                        temperature=budget.sample_temperature, num_samples=budget.samples_per_question,
                        stop_token_ids=stop, seed=[_stable_seed(seed, q["id"]) for q in batch])
        with open(path, "a") as f:
            for q, samples in zip(batch, outs):
                responses = []
                for s in samples:
                    ids = [int(t) for t in s.token_ids]
                    text = vocab.decode([t for t in ids if t not in stop], tok, errors="replace")
                    responses.append({"response_ids": ids, "text": text,
                                      "correct": task.is_correct(text, q["reference"])})
                rec = {"id": q["id"], "prompt_ids": q["prompt_ids"], "reference": q["reference"],
                       "problem": q["meta"]["problem"], "responses": responses}
                done[q["id"]] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        n = min(start + batch_questions, len(todo))
        progress(f"[posttrain] sampled {n}/{len(todo)} questions x {budget.samples_per_question} "
                 f"({time.time() - t0:.0f}s)")
    return [done[q["id"]] for q in questions]


def _pts_pairs(checkpoint: str, questions_path: Path, vocab_path: str, out_dir: Path, budget: PostTrainBudget,
               seed: int) -> dict:
    """Run the project's PTS tool (resumable: its journal) and return its summary."""
    import megatron_phi4
    from megatron_phi4.posttrain.pts_tool import main as pts_main

    argv = ["--checkpoint", str(checkpoint), "--questions", str(questions_path),
            "--oracle", f"{__name__}:ArithmeticAnswerOracle", "--output", str(out_dir), "--id-map", str(vocab_path),
            "--rollouts", str(budget.pts_rollouts), "--p-gap", str(budget.pts_p_gap),
            "--temperature", str(budget.pts_temperature), "--max-new-tokens", str(budget.max_new_tokens),
            "--seed", str(seed), "--device", "cpu"]
    rc = pts_main(argv, load_model=megatron_phi4.load_model)
    if rc != 0:
        raise RuntimeError(f"pivotal_token_search {' '.join(argv)}: exit status {rc}")
    return json.loads((out_dir / "summary.json").read_text())


def _fits(pair: dict, seq_length: int) -> bool:
    """The whole pair fits a training row (the collate would otherwise cut prompt tokens)."""
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) <= seq_length + 1


def _make_pairs(source: str, checkpoint: str, questions: List[dict], round_dir: Path, vocab, vocab_path: str,
                budget: PostTrainBudget, seed: int, progress) -> tuple[Path, dict]:
    """The round's pairs file (capped to ``max_pairs``, every pair fitting ``dpo_seq_length``) and
    what making it spent."""
    pairs_path = round_dir / "pairs.jsonl"
    info_path = round_dir / "pairs.info.json"
    if pairs_path.is_file() and info_path.is_file():
        return pairs_path, json.loads(info_path.read_text())
    qpath = round_dir / "questions.jsonl"
    _write_jsonl(qpath, ({k: q[k] for k in ("id", "prompt_ids", "reference", "meta")} for q in questions))
    t0 = time.time()
    if source == "pts":
        summary = _pts_pairs(checkpoint, qpath, vocab_path, round_dir / "pts", budget, seed)
        pairs = _read_jsonl(round_dir / "pts" / "pairs.jsonl")
        info = {"questions": len(questions), "questions_by_status": summary["questions_by_status"],
                "pivotal_tokens": summary["pivotal_tokens"], "rollouts": summary["rollouts"]}
    else:
        sampled = sample_round(checkpoint, questions, vocab, round_dir / "samples.jsonl", budget, seed, progress)
        responses = [r for s in sampled for r in s["responses"]]
        info = {"questions": len(questions), "responses": len(responses),
                "responses_correct": sum(r["correct"] for r in responses)}
        if source == "judge":
            from megatron_phi4.posttrain.judge import JudgePairOptions, build_judge_pairs
            judged = round_dir / "judged.jsonl"
            _write_jsonl(judged, (judged_record(s) for s in sampled))
            report = build_judge_pairs([str(judged)], str(round_dir / "judge_pairs.jsonl"), JudgePairOptions())
            pairs = _read_jsonl(round_dir / "judge_pairs.jsonl")
            info["judge_outputs"] = report["outputs"]
        elif source == "full":
            pairs = [p for s in sampled for p in full_response_pairs(s)]
        else:
            raise ValueError(f"pair source: got {source!r}, allowed: pts, judge, full")
    fitting = [p for p in pairs if _fits(p, budget.dpo_seq_length)]
    kept = cap_pairs(fitting, budget.max_pairs, _stable_seed(seed, str(round_dir.name)))
    if not kept:
        raise RuntimeError(f"{round_dir}: the round produced no pairs ({info}); raise questions_per_round")
    info.update(pairs_found=len(pairs), pairs_too_long=len(pairs) - len(fitting), pairs=len(kept),
                pair_tokens=sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in kept),
                seconds=round(time.time() - t0, 1))
    _write_jsonl(pairs_path, kept)
    atomic_write_json(info_path, info)
    progress(f"[posttrain] {round_dir.name}: {info['pairs']} pairs ({source}; {info})")
    return pairs_path, info


# ------------------------------------------------------------------------------------ evaluation
def _evaluate(name: str, checkpoint: str, problems: List[dict], vocab, budget: PostTrainBudget, seed: int,
              eval_dir: Path, progress, pairs: Optional[int] = None) -> ModelRow:
    """Greedy and sampled (T=0.7) accuracy of one model, reused from ``eval_dir/<name>.json`` when
    its checkpoint, problems and settings are the same."""
    key = {"checkpoint": str(checkpoint), "problems": _digest([p["id"] for p in problems]), "seed": seed,
           "temperature": EVAL_TEMPERATURE, "max_new_tokens": budget.eval_max_new_tokens}
    path = eval_dir / f"{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return ModelRow(name, str(checkpoint), Accuracy(**saved["greedy"]), Accuracy(**saved["sampled"]), pairs)
    t0 = time.time()
    res = evaluate_accuracy(_load(checkpoint), problems, vocab=vocab, max_new_tokens=budget.eval_max_new_tokens,
                            temperature=EVAL_TEMPERATURE, seed=seed, batch_size=budget.eval_batch_size,
                            min_problems=min(len(problems), 500), log=None)
    atomic_write_json(path, {"key": key, "greedy": asdict(res.greedy), "sampled": asdict(res.sampled),
                             "seconds": round(time.time() - t0, 1)})
    progress(f"[posttrain] {name}: greedy {res.greedy}; sampled T={EVAL_TEMPERATURE} {res.sampled} "
             f"({time.time() - t0:.0f}s)")
    return ModelRow(name, str(checkpoint), res.greedy, res.sampled, pairs)


def _check_settings(path: Path, settings: dict) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        if isinstance(old.get("budget"), dict):  # fields added since that run: their defaults, which it used
            old["budget"] = {**asdict(PostTrainBudget()), **old["budget"]}
        for k in sorted(set(old) | set(settings)):
            if old.get(k) != settings.get(k):
                raise ValueError(f"{path}: this work_dir holds post-training with {k}={old.get(k)!r}, now "
                                 f"{k}={settings.get(k)!r}; use another work_dir or delete {path.parent}")
    else:
        atomic_write_json(path, settings)


# ---------------------------------------------------------------------------------- entry point
def run_posttraining(sft_checkpoint: str, *, vocab, data, work_dir: str, method: str = "pts_judge",
                     eval_problems=None, num_eval: int = 500, budget=None, seed: int = 1234,
                     progress=print) -> PostTrainReport:
    """Evaluate the SFT model, run the two DPO rounds of ``method`` and evaluate each result; see
    the module docstring. ``vocab``: the :class:`~megatron_phi4.demo.trimmed_vocab.TrimmedVocab`;
    ``data``: the :class:`~megatron_phi4.demo.arithmetic_data.ArithmeticData` (held-out problems
    from its test split unless ``eval_problems`` -- problem records -- is given; round questions
    from its training pool). ``budget``: a :class:`PostTrainBudget` (default: the defaults)."""
    t0 = time.time()
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, allowed: {', '.join(METHODS)}")
    budget = budget or PostTrainBudget()
    if not isinstance(budget, PostTrainBudget):
        raise TypeError(f"budget: expected a PostTrainBudget, got {type(budget).__name__}")
    problems = list(eval_problems) if eval_problems is not None else read_problems(data.test_problems)
    if num_eval < 1 or len(problems) < num_eval:
        raise ValueError(f"num_eval: {num_eval} held-out problems wanted, {len(problems)} available")
    problems = problems[:num_eval]
    pool = read_problems(data.train_pool_problems)
    q = budget.questions_per_round
    if len(pool) < 2 * q:
        raise ValueError(f"{data.train_pool_problems}: {len(pool)} training-pool problems, the two rounds need "
                         f"2 x questions_per_round = {2 * q}")
    held_out = {task.Problem(**p["meta"]["problem"]).key for p in problems if "meta" in p}
    leaked = [p["id"] for p in pool[:2 * q] if task.Problem(**p["meta"]["problem"]).key in held_out]
    if leaked:
        raise ValueError(f"eval_problems: {len(leaked)} of them are round questions (e.g. {leaked[0]}); "
                         "held-out problems must never be trained on")
    work = Path(work_dir).resolve()
    sft_checkpoint = str(Path(sft_checkpoint).resolve())
    _check_settings(work / method / "settings.json",
                    {"sft_checkpoint": sft_checkpoint, "budget": asdict(budget), "seed": int(seed),
                     "train_pool": str(data.train_pool_problems)})
    eval_dir = work / "eval"
    rows = [_evaluate("sft", sft_checkpoint, problems, vocab, budget, seed, eval_dir, progress)]
    rounds = []
    current = sft_checkpoint
    for k, (name, source) in enumerate(ROUNDS[method]):
        round_dir = work / method / name
        pairs_path, info = _make_pairs(source, current, pool[k * q:(k + 1) * q], round_dir, vocab,
                                       data.vocab_path, budget, _stable_seed(seed, name), progress)
        t_round = time.time()
        current = _train_round(name, current, pairs_path, round_dir / "run", vocab, budget, seed, progress)
        rounds.append({"name": name, "source": source, "init": rows[-1].checkpoint, **info,
                       "dpo_steps": budget.dpo_steps, "pairs_trained": budget.pairs_trained_per_round,
                       "train_seconds": round(time.time() - t_round, 1)})
        rows.append(_evaluate(name, current, problems, vocab, budget, seed, eval_dir, progress, info["pairs"]))
    report = PostTrainReport(method=method, rows=rows, num_eval=len(problems), budget=budget, rounds=rounds,
                             wall_s=time.time() - t0)
    atomic_write_json(work / method / "report.json", {"method": method, "rows": [r.to_dict() for r in rows],
                                                      "rounds": rounds, "budget": asdict(budget),
                                                      "num_eval": len(problems)})
    return report
