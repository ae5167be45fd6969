"""Where a DPO round moved the model: teacher-forced log-probs of the held-out reference solutions
under the SFT model and under a round's DPO model, grouped by token id -- ids that were a pair's
rejected completion, ids that were a pair's chosen completion, and every other id.

    python benchmarks/dpo_token_shift.py --work-dir /tmp/posttrain_gain [--round pts_judge/dpo1]

Reads what ``benchmarks/posttrain_gain.py`` left in ``--work-dir`` (the arithmetic model, its
trimmed vocabulary and test split; ``<posttrain-dir>/<round>/pairs.jsonl`` and the round's last DPO
checkpoint). Only single-token pairs (PTS rounds) are grouped by id; for a full-response round only
the whole-solution change is meaningful. Every reference solution is correct, so a negative mean
change for the "rejected ids" group means the round made those ids less likely *where they are the
right token*: a global shift, not the contextual one the pairs asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def solution_log_probs(model, sequences):
    """[(prompt ids, completion ids)] -> one fp32 tensor of completion-token log-probs per sequence."""
    import torch

    out = []
    with torch.no_grad():
        for prompt, completion in sequences:
            ids = torch.tensor([prompt + completion])
            labels = torch.full_like(ids, -100)
            labels[0, len(prompt) - 1:-1] = torch.tensor(completion)  # position t predicts token t+1
            out.append(model(ids, labels=labels)[0, len(prompt) - 1:-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/posttrain_gain")
    ap.add_argument("--posttrain-dir", default=None, help="default: WORK_DIR/posttrain")
    ap.add_argument("--round", default="pts_judge/dpo1", help="METHOD/ROUND under the post-training dir")
    ap.add_argument("--num-eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    import torch

    from megatron_phi4.api import load_model
    from megatron_phi4.checkpoint.format import CheckpointError, resolve_checkpoint
    from megatron_phi4.demo import arithmetic as task
    from megatron_phi4.demo.arithmetic_data import read_problems
    from megatron_phi4.demo.arithmetic_run import train_arithmetic_model
    from megatron_phi4.tokenizer import get_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = os.path.join(args.work_dir, "model")
    round_dir = os.path.join(args.posttrain_dir or os.path.join(args.work_dir, "posttrain"), args.round)
    pairs_path = os.path.join(round_dir, "pairs.jsonl")
    if not os.path.isdir(os.path.join(model_dir, "run")):
        raise SystemExit(f"{model_dir}: no trained arithmetic model; run benchmarks/posttrain_gain.py first")
    if not os.path.isfile(pairs_path):
        raise SystemExit(f"{pairs_path}: no pairs for round {args.round!r}; run benchmarks/posttrain_gain.py first")
    try:
        dpo_ckpt = str(resolve_checkpoint(os.path.join(round_dir, "run", "checkpoints")))
    except CheckpointError as e:
        raise SystemExit(f"round {args.round!r} has no finished DPO checkpoint: {e}")
    arith = train_arithmetic_model(model_dir)  # reuses the finished model (refuses a different one)
    with open(pairs_path) as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    single = all(len(p["chosen_ids"]) == 1 and len(p["rejected_ids"]) == 1 for p in pairs)
    rejected = {p["rejected_ids"][0] for p in pairs} if single else set()
    chosen = {p["chosen_ids"][0] for p in pairs} if single else set()

    tok = get_tokenizer()
    problems = read_problems(arith.data.test_problems)[:args.num_eval]
    sequences = []
    for rec in problems:
        solution = task.worked_solution(task.Problem(**rec["meta"]["problem"]))
        completion = arith.vocab.to_trimmed(tok.encode(solution)) + [arith.vocab.im_end_id]
        sequences.append(([int(t) for t in rec["prompt_ids"]], completion))
    before = solution_log_probs(load_model(arith.sft_checkpoint).eval(), sequences)
    after = solution_log_probs(load_model(dpo_ckpt).eval(), sequences)

    groups = {"rejected ids": [], "chosen ids": [], "other ids": []}
    whole = []
    for (_, completion), a, b in zip(sequences, before, after):
        for t, d in zip(completion, (b - a).tolist()):
            groups["rejected ids" if t in rejected else "chosen ids" if t in chosen else "other ids"].append(d)
        whole.append(float((b - a).sum()))
    print(f"{args.round}: {len(pairs)} pairs ({len(rejected)} distinct rejected ids, {len(chosen)} chosen, "
          f"{len(rejected & chosen)} both); {len(problems)} held-out reference solutions\n  SFT {arith.sft_checkpoint}\n"
          f"  DPO {dpo_ckpt}\n")
    print("| token group | tokens | mean change of log p (nats) | share that decreased |")
    print("|---|---|---|---|")
    for name, deltas in groups.items():
        if deltas:
            d = torch.tensor(deltas)
            print(f"| {name} | {len(d)} | {d.mean():+.4f} | {(d < 0).float().mean():.2f} |")
    print(f"| whole solutions | {len(whole)} | {torch.tensor(whole).mean():+.4f} per solution | "
          f"{(torch.tensor(whole) < 0).float().mean():.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
