"""The Transformer Engine backend against the local backend, on a GPU with TE (NGC containers).

Skipped elsewhere (markers ``te`` and ``gpu``, tests/conftest.py); the name/layout mapping itself is
proven without TE in test_te_mapping.py. Run in an NGC PyTorch container:
``python -m pytest -q tests/layers/test_te_backend.py`` (the TP=2 test needs two GPUs).

Checked: same seed -> same checkpoint tensors; logits and every gradient (by checkpoint name) equal
the local backend's, for plain and packed batches (TE's "thd" + cu_seqlens vs the local dense
mask); checkpoints cross both ways; TP=2 (+SP) over NCCL equals one process; each FP8 recipe the
GPU supports trains a tiny model to within 2% of the bf16 loss.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytestmark = [pytest.mark.te, pytest.mark.gpu]

# fp32 parameters; TE's GEMMs may use TF32 and its attention kernels reduce in another order
RTOL, ATOL = 2e-3, 2e-3


def _cfg(backend="te", **kw):
    from megatron_phi4.config import ModelConfig

    base = dict(vocab_size=512, hidden_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                intermediate_size=256, max_seq_length=256, rope_theta=10000.0)
    return ModelConfig(**{**base, **kw}, backend=backend)


def _pair(seed=3, **kw):
    from megatron_phi4.models.phi4.model import build_model

    torch.backends.cuda.matmul.allow_tf32 = False
    return build_model(_cfg("te", **kw), "cuda", seed), build_model(_cfg("local", **kw), "cuda", seed)


def _named_grads(model):
    """Gradients under checkpoint names (the state-dict hooks split fused parameters)."""
    layout = model.checkpoint_layout()
    out = {}
    for fqn, p in model.named_parameters():
        for piece in layout[fqn]:
            out[piece.name] = p.grad[piece.rows[0]:piece.rows[1]]
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_te_matches_local_forward_and_backward(packed):
    te_model, local = _pair()
    sd_te, sd_local = te_model.state_dict(), local.state_dict()
    assert list(sd_te) == list(sd_local) and all(torch.equal(sd_te[k], sd_local[k]) for k in sd_te)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 64), generator=g).cuda()
    kw = {}
    if packed:
        doc = (torch.arange(64) >= 23).long() + (torch.arange(64) >= 50).long()
        pos = torch.cat([torch.arange(23), torch.arange(27), torch.arange(14)])
        kw = dict(document_ids=doc.expand(2, 64).cuda(), position_ids=pos.expand(2, 64).cuda())
    out_te, out_local = te_model(tokens, **kw), local(tokens, **kw)
    torch.testing.assert_close(out_te, out_local, rtol=RTOL, atol=ATOL)
    out_te.float().logsumexp(-1).mean().backward()
    out_local.float().logsumexp(-1).mean().backward()
    gt, gl = _named_grads(te_model), _named_grads(local)
    assert set(gt) == set(gl)
    for k in gl:
        torch.testing.assert_close(gt[k], gl[k], rtol=1e-2, atol=1e-4, msg=k)


def test_te_checkpoint_round_trip(tmp_path):
    from megatron_phi4.api import load_model
    from megatron_phi4.checkpoint.format import save_model_weights
    from megatron_phi4.models.phi4.model import build_model

    te_model, _ = _pair(seed=5)
    save_model_weights(te_model.state_dict(), tmp_path / "ckpt", _cfg("te"))
    local = load_model(tmp_path / "ckpt", device="cuda", backend="local")
    tokens = torch.randint(0, 512, (1, 32)).cuda()
    torch.testing.assert_close(local(tokens), te_model(tokens), rtol=RTOL, atol=ATOL)
    back = build_model(_cfg("te"), "cuda", seed=0)
    back.load_state_dict(local.state_dict())
    assert torch.equal(back.layers["1"].mlp.fc1_weight, te_model.layers["1"].mlp.fc1_weight)


def _tp_worker(rank, world, port, sequence_parallel, out_path):
    import torch.distributed as dist

    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from tests.layers.test_float8 import _train
    from tests.parallel._parity import make_lm_microbatches

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    pcfg = ParallelConfig(tp=2, sequence_parallel=sequence_parallel, mixed_precision="fp32")
    engine = ParallelEngine(_cfg("te"), pcfg, ParallelDims.build(pcfg, model_cfg=_cfg()), seed=9)
    steps = [make_lm_microbatches(2, seq=64, seed=300 + s, packed=s == 1) for s in range(3)]
    losses, full = _train(engine, steps)
    if rank == 0:
        torch.save({"losses": losses, "full": full}, out_path)
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_te_tp2_over_nccl_matches_one_process(tmp_path, sequence_parallel):
    import torch.multiprocessing as mp

    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from tests.distributed_utils import free_port
    from tests.layers.test_float8 import _train
    from tests.parallel._parity import make_lm_microbatches

    out = tmp_path / "tp.pt"
    mp.start_processes(_tp_worker, args=(2, free_port(), sequence_parallel, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out)
    engine = ParallelEngine(_cfg("local"), ParallelConfig(dp_shard="none"), ParallelDims(1, 1, 1, device=torch.device("cuda")), seed=9)
    steps = [make_lm_microbatches(2, seq=64, seed=300 + s, packed=s == 1) for s in range(3)]
    ref_losses, ref_full = _train(engine, steps)
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-3)
    for k, v in ref_full.items():
        torch.testing.assert_close(got["full"][k], v, rtol=1e-2, atol=1e-4, msg=k)


def _supported_recipes():
    if not torch.cuda.is_available():
        return []
    cc = torch.cuda.get_device_capability()
    return [r for r, need in (("delayed", (8, 9)), ("tensorwise", (8, 9)), ("blockwise", (9, 0)), ("mxfp8", (10, 0)))
            if cc >= need]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_te_fp8_recipe_trains_within_2_percent_of_bf16(recipe):
    from megatron_phi4.config import FP8Config
    from megatron_phi4.losses import LMLoss
    from megatron_phi4.models.phi4.model import build_model
    from tests.layers.test_float8 import _learnable_batches

    if recipe not in _supported_recipes():
        pytest.skip(f"{recipe} needs a newer GPU")
    final = {}
    for name, fp8 in (("bf16", FP8Config()), ("fp8", FP8Config(enabled=True, recipe=recipe))):
        model = build_model(dataclasses.replace(_cfg("te"), fp8=fp8), "cuda", seed=7)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for mb in _learnable_batches(40):
            mb = {k: v.cuda() for k, v in mb.items()}
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = LMLoss()(model(mb["input_ids"]), mb)
            loss = out.loss_sum / LMLoss().units(mb)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        final[name] = sum(losses[-5:]) / 5
    assert abs(final["fp8"] - final["bf16"]) / final["bf16"] < 0.02, final
