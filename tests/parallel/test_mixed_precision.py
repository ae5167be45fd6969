"""bf16 compute with fp32 master weights and fp32 gradient reduction, with FSDP2 and without it.

CPU autocast and FSDP2's MixedPrecisionPolicy both run bf16 here, so the numerics are checked in CI:
the bf16 step is close to the fp32 one (and measurably different: bf16 really ran), parameters and
gradients stay fp32, and without FSDP the replicated all-reduce (DP=2) and the pipeline (PP=2,
fp32 hidden states and bf16 logits between stages) reproduce a single-process bf16 run to fp32
rounding -- a bf16 reduction would miss that by orders of magnitude."""
import pytest
import torch

from tests.distributed_utils import run_distributed
from tests.parallel._parity import make_lm_microbatches, make_steps, parallel_run, rel_err, tiny_cfg


def _one_step(rank, world, layout):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.build(pcfg, model_cfg=tiny_cfg())
    engine = ParallelEngine(tiny_cfg(), pcfg, dims, seed=0)
    logits_dtypes = []
    # Every decoder linear's output (the model returns label log-probs, fp32 by design, not logits):
    # the matmuls must run in bf16.
    for module in engine.model_parts[0].modules():
        if type(module).__name__.endswith("Linear"):
            module.register_forward_hook(
                lambda m, a, out: logits_dtypes.append(out.dtype) if torch.is_tensor(out) else None)
    mbs = make_lm_microbatches(2, seed=3)
    loss_fn = LMLoss()
    out = engine.forward_backward(mbs, loss_fn, engine.global_units(mbs, loss_fn))
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    grads = {n: full(p.grad).detach().clone() for n, p in engine.named_parameters()}
    return (out["loss"], grads, {str(p.dtype) for p in engine.parameters()},
            {str(g.dtype) for g in grads.values()}, {str(d) for d in logits_dtypes})


def _fp32_and_bf16(rank, world, dp_shard):
    return [_one_step(rank, world, dict(dp_shard=dp_shard, mixed_precision=mp)) for mp in ("fp32", "bf16")]


@pytest.mark.parametrize("dp_shard", ["none", "fsdp"], ids=["autocast", "fsdp2-policy"])
def test_bf16_step_close_to_fp32(dp_shard):
    ((loss32, g32, *_), (loss16, g16, param_dtypes, grad_dtypes, logits_dtypes)), = run_distributed(
        _fp32_and_bf16, 1, dp_shard)
    assert param_dtypes == {"torch.float32"} and grad_dtypes == {"torch.float32"}  # fp32 master weights/grads
    assert logits_dtypes == {"torch.bfloat16"}  # the matmuls ran in bf16 (fp32 under mixed_precision=fp32)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9): about 1% on the gradients, far less on
    # the loss; and above 1e-4, which fp32 reordering alone never reaches.
    assert abs(loss16 - loss32) / loss32 < 1e-3
    errs = [rel_err(g16[n], g32[n]) for n in g32]
    assert max(errs) < 5e-2
    assert sum(errs) / len(errs) > 1e-4


@pytest.mark.parametrize("layout,world", [
    (dict(dp_shard="none", mixed_precision="bf16"), 2),
    (dict(dp_shard="none", mixed_precision="bf16", pp=2, pp_schedule="1f1b"), 2),
], ids=["dp2-replicated", "pp2"])
def test_bf16_without_fsdp_matches_single_process_bf16(layout, world):
    steps = make_steps("lm", 2, 4)
    ref_losses, ref_norms, ref_params = run_distributed(
        parallel_run, 1, dict(dp_shard="none", mixed_precision="bf16"), "lm", steps, 4)[0]
    dp = world // layout.get("pp", 1)
    losses, norms, params = run_distributed(parallel_run, world, layout, "lm", steps, 4 // dp)[0]
    # Identical bf16 compute per micro-batch; only the order of fp32 sums differs.
    for a, b in zip(losses + norms, ref_losses + ref_norms):
        assert abs(a - b) <= 1e-5 * abs(b)
    for name, ref in ref_params.items():
        assert params[name].dtype == torch.float32
        assert rel_err(params[name], ref) < 1e-5, name
