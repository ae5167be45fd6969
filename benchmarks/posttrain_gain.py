"""Evidence that post-training teaches: held-out accuracy after SFT, after each DPO round (PTS ->
token-level DPO -> rule-judge DPO), and after plain full-response DPO on the same budget.

    python benchmarks/posttrain_gain.py [--work-dir /tmp/posttrain_gain] [--num-eval 500]

(about 11 minutes on an idle 2-core machine, model training included; docs/posttraining.md).

Trains the tiny arithmetic Phi-4 (pre-training + SFT, megatron_phi4.demo.arithmetic_run; reused when
``--work-dir`` already holds it), then runs ``megatron_phi4.demo.posttrain_rounds.run_posttraining``
for ``pts_judge`` and ``full_response`` and prints one table: every model's greedy and sampled
(T=0.7) accuracy on ``--num-eval`` held-out test-split problems (never in any training, SFT or
post-training stage: the splits are disjoint by problem), with 95% Wilson intervals, plus the wall
time of each phase. Everything is resumable: rerunning with the same work dir reuses finished work.
Designed for 2 CPU cores (see docs/posttraining.md, "Evidence that it teaches").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/posttrain_gain")
    ap.add_argument("--num-eval", type=int, default=500, help="held-out problems (>= 500 for the documented table)")
    ap.add_argument("--posttrain-dir", default=None, help="post-training work dir (default: WORK_DIR/posttrain)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--methods", default="pts_judge,full_response")
    ap.add_argument("--budget", default="{}", help="JSON overrides of PostTrainBudget fields")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default, every core; 1 on a machine shared with other jobs)")
    args = ap.parse_args(argv)

    import torch

    from megatron_phi4.demo.arithmetic_run import train_arithmetic_model
    from megatron_phi4.demo.posttrain_rounds import PostTrainBudget, PostTrainReport, run_posttraining

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = train_arithmetic_model(os.path.join(args.work_dir, "model"), seed=args.seed)
    t_model = time.time() - t0
    print(f"[posttrain_gain] arithmetic model: {t_model:.0f}s ({model.sft_checkpoint})", flush=True)
    budget = PostTrainBudget(**json.loads(args.budget))
    reports, times = {}, {"pre-training + SFT": t_model}
    for method in args.methods.split(","):
        t = time.time()
        reports[method] = run_posttraining(model.sft_checkpoint, vocab=model.vocab, data=model.data,
                                           work_dir=args.posttrain_dir or os.path.join(args.work_dir, "posttrain"), method=method,
                                           num_eval=args.num_eval, budget=budget, seed=args.seed)
        times[method] = time.time() - t
    total = time.time() - t0
    rows, seen = [], set()
    for rep in reports.values():
        rows += [r for r in rep.rows if r.name not in seen]
        seen.update(r.name for r in rep.rows)
    first = next(iter(reports.values()))
    table = PostTrainReport(method="+".join(reports), rows=rows, num_eval=first.num_eval, budget=budget).to_markdown()
    print(f"\nHeld-out accuracy, {first.num_eval} test-split problems, 95% Wilson intervals:\n")
    print(table)
    for method, rep in reports.items():
        for r in rep.rounds:
            spent = {k: r[k] for k in ("questions", "pivotal_tokens", "rollouts", "responses", "responses_correct",
                                       "pairs_found", "pairs", "pair_tokens", "dpo_steps", "pairs_trained")
                     if k in r}
            print(f"  {r['name']} ({r['source']} pairs): {spent}")
    print("\nwall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f"; total {total:.0f}s")
    print(f"budget: {budget}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
