#!/usr/bin/env python
"""Thin wrapper: see megatron_phi4/posttrain/pts_tool.py and docs/posttraining.md#pivotal-token-search.

  pivotal_token_search.py --checkpoint CKPT --questions Q.jsonl --oracle numeric --output DIR
      [--rollouts 64] [--p-gap 0.2] [--min-p 0.2 --max-p 0.8] [--temperature 1.0] [--max-new-tokens 512]
      [--id-map vocab.json | --id-map module:attr] [--tp N] [--limit N] [--export-only]
  torchrun --nproc-per-node 8 pivotal_token_search.py ...        # questions spread over the ranks
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_phi4 import load_model  # noqa: E402
from megatron_phi4.posttrain.pts_tool import main  # noqa: E402
from megatron_phi4.process import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(main, load_model=load_model)  # no interpreter finalization (megatron_phi4/process.py)
