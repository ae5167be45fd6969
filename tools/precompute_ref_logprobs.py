#!/usr/bin/env python
"""Reference log-probs for a DPO stage, computed once under any layout; see
megatron_phi4/posttrain/ref_logprobs.py. ``torchrun --nproc-per-node N tools/precompute_ref_logprobs.py ...``"""
import sys

from megatron_phi4.posttrain.ref_logprobs import main

if __name__ == "__main__":
    sys.exit(main())
