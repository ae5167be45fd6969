#!/usr/bin/env python
"""Thin wrapper: see megatron_phi4/checkpoint/hf_convert.py and docs/checkpoints.md.

  convert_checkpoint.py import-hf --hf-dir DIR --output CKPT [--dtype keep|fp32|bf16|fp16] [--check]
  convert_checkpoint.py export-hf --checkpoint CKPT_OR_ROOT --output DIR [--dtype ...] [--max-shard-size 5GB]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_phi4.checkpoint.hf_convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
