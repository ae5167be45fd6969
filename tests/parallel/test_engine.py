"""Engine bookkeeping: shards, full state dicts, forward-only passes, reference log-probs."""
import pytest
import torch

from tests.distributed_utils import run_distributed
from tests.parallel._parity import make_dpo_microbatches, tiny_cfg


def _reference(mbs, theta=None):
    from megatron_phi4.losses import DPOLoss, sequence_log_probs
    from megatron_phi4.models.phi4.model import build_model

    model = build_model(tiny_cfg(), "cpu", 0)
    if theta is not None:
        model.rope_theta = theta
    loss_fn = DPOLoss(beta=0.1)
    with torch.no_grad():
        logits = [model(mb["input_ids"]) for mb in mbs]
        seq = [sequence_log_probs(lg, mb["labels"], mb["loss_mask"]) for lg, mb in zip(logits, mbs)]
        outs = [loss_fn(lg, mb) for lg, mb in zip(logits, mbs)]
    units = sum(float(o.units) for o in outs)
    return (seq, sum(float(o.loss_sum) for o in outs) / units,
            {k: sum(float(o.metrics[k]) for o in outs) / units for k in outs[0].metrics}, model.state_dict())


def _engine_checks(rank, world, layout, mbs):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.losses import DPOLoss
    from megatron_phi4.models.phi4.model import build_model

    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.build(pcfg, model_cfg=tiny_cfg())
    engine = ParallelEngine(tiny_cfg(), pcfg, dims, seed=0)
    out = {}
    # Every element of every parameter is written by exactly one rank.
    shards = {n: (t.shape, info) for n, (t, info) in engine.local_shards().items()}
    out["shards"] = shards
    out["full"] = engine.full_state_dict()
    n = len(mbs) // dims.dp
    mine = mbs[dims.dp_rank * n:(dims.dp_rank + 1) * n]
    loss_fn = DPOLoss(beta=0.1)
    units = engine.global_units(mine, loss_fn)
    out["eval"] = engine.forward_only(mine, loss_fn, units)
    out["seq"] = engine.sequence_log_probs(mine)
    # The optimizer state has the local shape of its parameter (so the same layout cuts it).
    from megatron_phi4.distributed.sharding import local_tensor

    opt = torch.optim.AdamW(engine.parameters(), lr=1e-3)
    engine.forward_backward(mine, loss_fn, units)
    opt.step()
    out["opt_shapes_ok"] = all(local_tensor(opt.state[p]["exp_avg"]).shape == local_tensor(p).shape
                               for _, p in engine.named_parameters())
    # Loading a different full state dict, then reading it back.
    other = build_model(tiny_cfg(), "cpu", 7).state_dict()
    engine.load_full_state_dict(other)
    back = engine.full_state_dict()
    out["load_ok"] = all(torch.equal(back[k], other[k]) for k in other)
    engine.set_rope_theta(500.0)
    engine.load_full_state_dict(build_model(tiny_cfg(), "cpu", 0).state_dict())
    out["theta_eval"] = engine.forward_only(mine, loss_fn, units)
    return out


@pytest.mark.parametrize("layout,world", [
    (dict(tp=2, pp=2, pp_schedule="1f1b"), 4),
    (dict(tp=2, sequence_parallel=True), 4),  # dp=2 with FSDP shards
    (dict(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2), 2),
], ids=["tp2-pp2", "tp2-sp-dp2", "pp2-interleaved"])
def test_engine_state_and_forward_only(layout, world):
    mbs = make_dpo_microbatches(4, pairs=1, seed=5)
    seq, loss, metrics, sd = _reference(mbs)
    _, loss_theta, _, _ = _reference(mbs, theta=500.0)
    results = run_distributed(_engine_checks, world, layout, mbs)
    dp = world // (layout.get("tp", 1) * layout.get("pp", 1))
    coverage = {k: torch.zeros(v.shape, dtype=torch.int32) for k, v in sd.items()}
    for rank, r in enumerate(results):
        for k in sd:
            torch.testing.assert_close(r["full"][k], sd[k], rtol=0, atol=0)
        for name, (shape, info) in r["shards"].items():
            assert info.global_shape == tuple(sd[name].shape)
            if not info.replicated:
                idx = tuple(slice(o, o + s) for o, s in zip(info.global_offset, shape))
                coverage[name][idx] += 1
        assert r["eval"]["loss"] == pytest.approx(loss, rel=1e-5)
        for k, v in metrics.items():
            assert r["eval"]["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6)
        assert r["theta_eval"]["loss"] == pytest.approx(loss_theta, rel=1e-5)
        assert r["theta_eval"]["loss"] != pytest.approx(loss, rel=1e-7)
        dp_rank = (rank // layout.get("tp", 1)) % dp
        n = len(mbs) // dp
        for got, want in zip(r["seq"], seq[dp_rank * n:(dp_rank + 1) * n]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        assert r["opt_shapes_ok"] and r["load_ok"]
    for name, c in coverage.items():
        assert int(c.min()) == 1 and int(c.max()) == 1, name


def _boom(rank, world):
    if rank == 1:
        raise ValueError("rank one fails")
    import torch.distributed as dist

    dist.barrier()


def test_run_distributed_reports_rank_errors():
    from tests.distributed_utils import DistributedTestError, run_distributed

    assert run_distributed(lambda r, w, x: (r, w, x), 3, "x") == [(0, 3, "x"), (1, 3, "x"), (2, 3, "x")]
    with pytest.raises(DistributedTestError, match="rank 1: ValueError: rank one fails"):
        run_distributed(_boom, 2, timeout=60)


def _logits_vs_label_log_probs(rank, world):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss
    from tests.parallel._parity import make_lm_microbatches

    class LogitsLM(LMLoss):  # a loss that asks for the logits (this rank's vocabulary shard)
        inputs = "logits"

    pcfg = ParallelConfig(tp=2, pp=2, pp_schedule="1f1b")
    dims = ParallelDims.build(pcfg, model_cfg=tiny_cfg())
    engine = ParallelEngine(tiny_cfg(), pcfg, dims, seed=0)
    mbs = make_lm_microbatches(4, packed=True)
    out = {}
    for loss_fn in (LMLoss(), LogitsLM()):
        engine.zero_grad()
        res = engine.forward_backward(mbs, loss_fn, engine.global_units(mbs, loss_fn))
        out[loss_fn.inputs] = (res["loss"], engine.clip_grad_norm_(0.0))
    return out


def test_logits_and_label_log_prob_losses_agree_under_tp_and_pp():
    """The last stage returns fp32 label log-probs (static metadata (mb, seq)) or its logits shard
    ((mb, seq, vocab / tp)), whichever the loss asks for; both train the same."""
    for r in run_distributed(_logits_vs_label_log_probs, 4):
        loss, norm = r["label_log_probs"]
        assert r["logits"][0] == pytest.approx(loss, rel=1e-5)
        assert r["logits"][1] == pytest.approx(norm, rel=1e-5)


def test_last_stage_static_metadata_follows_what_the_loss_reads():
    from megatron_phi4.distributed.pipeline import PipelineRunner

    runner = PipelineRunner([], [], 2, None, "1f1b", torch.device("cpu"), hidden_size=8, local_vocab=50,
                            seq_divisor=2, act_dtype=torch.bfloat16)
    _, out = runner._stage_meta(1, 3, 16, True, "label_log_probs")
    assert (tuple(out.shape), out.dtype, out.requires_grad) == ((3, 16), torch.float32, True)
    _, out = runner._stage_meta(1, 3, 16, False, "logits")
    assert (tuple(out.shape), out.dtype) == ((3, 16, 50), torch.bfloat16)
    inp, out = runner._stage_meta(0, 3, 16, True, "label_log_probs")  # not the last stage: hidden states
    assert tuple(inp.shape) == (3, 16) and tuple(out.shape) == (3, 8, 8)
