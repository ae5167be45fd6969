#!/usr/bin/env python
"""Reference log-probs for a DPO stage, computed once under any layout; see
megatron_phi4/posttrain/ref_logprobs.py. ``torchrun --nproc-per-node N tools/precompute_ref_logprobs.py ...``"""
from megatron_phi4.posttrain.ref_logprobs import main
from megatron_phi4.process import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)  # no interpreter finalization under gloo (megatron_phi4/process.py)
