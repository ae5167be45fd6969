"""Parallel training == single-process training (loss every step, grad norm, parameters after 3
AdamW steps with clipping), on CPU/gloo/fp32, for representative TP x PP x DP layouts.

Every run uses gradient accumulation of 4 micro-batches per DP rank, uneven loss masks (so the
token weighting across micro-batches and DP ranks matters) and clipping that is active.
The matrix covers TP {1,2} x PP {1,2} (1F1B, interleaved, GPipe) x DP {1,2}, sequence parallelism
on/off, recompute none/selective/full, packed documents, FSDP and replicated DP, LM and DPO (sigmoid, and
aot / ipo / aot_unpaired / sigmoid + TRL's sft term with two pairs per micro-batch),
without the full cross product.
"""
import pytest
import torch

from tests.distributed_utils import run_distributed
from tests.parallel._parity import make_steps, parallel_run, reference_run, rel_err

STEPS, MB_PER_RANK = 3, 4

LAYOUTS = [
    # id, world, ParallelConfig kwargs, loss, packed documents
    ("dp2-fsdp", 2, dict(), "lm", False),
    ("dp2-fsdp-sync-every-microbatch", 2, dict(engine_kwargs=dict(sync_grads_every_microbatch=True)), "lm", False),
    ("dp2-replicated", 2, dict(dp_shard="none"), "lm", True),
    # replicated DP with its all-reduce overlapping backward while TP/SP collectives run in it too
    ("tp2-sp-dp2-replicated", 4, dict(tp=2, sequence_parallel=True, dp_shard="none"), "lm", False),
    ("tp2", 2, dict(tp=2), "lm", False),
    ("tp2-sp-full-recompute-packed", 2, dict(tp=2, sequence_parallel=True, recompute="full"), "lm", True),
    ("pp2-1f1b-selective", 2, dict(pp=2, pp_schedule="1f1b", recompute="selective"), "lm", False),
    ("pp2-interleaved", 2, dict(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2), "lm", True),
    ("tp2-pp2-zero-bubble-sp-replicated", 4,
     dict(tp=2, pp=2, pp_schedule="zero_bubble", virtual_stages=2, sequence_parallel=True, dp_shard="none"), "lm",
     False),
    ("pp2-dp2-dpo", 4, dict(pp=2, pp_schedule="1f1b"), "dpo", False),
    ("tp2-pp2-gpipe-dpo-sp", 4, dict(tp=2, pp=2, pp_schedule="gpipe", sequence_parallel=True), "dpo", False),
    # DPO loss types beyond sigmoid (2 pairs per micro-batch; aot sorts within the micro-batch)
    ("tp2-dpo-aot", 2, dict(tp=2), "dpo:aot", False),
    ("pp2-dpo-ipo", 2, dict(pp=2, pp_schedule="1f1b"), "dpo:ipo", False),
    ("dp2-dpo-aot_unpaired", 2, dict(), "dpo:aot_unpaired", False),
    # + TRL's sft term (a token mean per micro-batch: the micro-batches must be the same chunks)
    ("tp2-pp2-dpo-sft", 4, dict(tp=2, pp=2, pp_schedule="1f1b"), "dpo:sigmoid+sft", False),
    ("tp2-pp2-dp2-interleaved-sp-selective", 8,
     dict(tp=2, pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2, sequence_parallel=True,
          recompute="selective"), "lm", False),
    ("tp2-pp2-dp2-1f1b-full-recompute", 8, dict(tp=2, pp=2, pp_schedule="1f1b", recompute="full"), "lm", True),
]


@pytest.mark.parametrize("name,world,layout,kind,packed", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_training_matches_single_process(name, world, layout, kind, packed):
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    dp = world // (tp * pp)
    data = make_steps(kind, STEPS, MB_PER_RANK * dp, packed=packed)
    ref_losses, ref_norms, ref_params = reference_run(kind, data)
    results = run_distributed(parallel_run, world, layout, kind, data, MB_PER_RANK, timeout=300)
    for rank, (losses, norms, _) in enumerate(results):  # identical on every rank
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"rank {rank} losses"
        assert norms == pytest.approx(ref_norms, rel=1e-5), f"rank {rank} grad norms"
        assert losses == results[0][0] and norms == results[0][1]
    params = results[0][2]
    assert set(params) == set(ref_params)
    for k, ref in ref_params.items():
        assert params[k].shape == ref.shape, k
        assert rel_err(params[k], ref) < 1e-5, f"{k}: relative error {rel_err(params[k], ref):.2e}"
        torch.testing.assert_close(params[k], ref, rtol=1e-4, atol=1e-5, msg=k)
