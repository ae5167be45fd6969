"""``parallel.compile``: every decoder block goes through ``torch.compile`` in place.

Through the engine (FSDP2 and full recompute on top, the hardest combination) with the
``aot_eager`` backend -- dynamo's graph capture and AOT autograd without code generation, seconds
on CPU -- the step is identical to eager and no parameter or checkpoint name changes. One test
compiles a block with inductor, the backend used on GPUs (C++ code generation on CPU: the slow one
here, about a minute on a busy 2-core machine)."""
import torch

from tests.distributed_utils import run_distributed
from tests.parallel._parity import make_lm_microbatches, tiny_cfg


def _engine_step(rank, world, compile_):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    pcfg = ParallelConfig(recompute="full", compile=compile_, compile_backend="aot_eager")
    dims = ParallelDims.build(pcfg, model_cfg=tiny_cfg())
    engine = ParallelEngine(tiny_cfg(), pcfg, dims, seed=0)
    mbs = make_lm_microbatches(2, seed=4)
    loss_fn = LMLoss()
    out = engine.forward_backward(mbs, loss_fn, engine.global_units(mbs, loss_fn))
    blocks = engine.spec.blocks(engine.model_parts[0])
    compiled = [getattr(b, "_compiled_call_impl", None) is not None for b in blocks]
    grads = {n: p.grad.full_tensor().clone() for n, p in engine.named_parameters()}
    return out["loss"], grads, list(engine.full_state_dict()), compiled


def _both(rank, world):
    return _engine_step(rank, world, False), _engine_step(rank, world, True)


def test_compiled_engine_step_equals_eager_and_keeps_names():
    (eager, compiled), = run_distributed(_both, 1)
    loss_e, grads_e, keys_e, flags_e = eager
    loss_c, grads_c, keys_c, flags_c = compiled
    assert flags_e == [False] * len(flags_e) and flags_c == [True] * len(flags_c) and flags_c
    assert keys_c == keys_e and list(grads_c) == list(grads_e)  # checkpoint and parameter names unchanged
    assert abs(loss_c - loss_e) <= 1e-6 * abs(loss_e)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-7, msg=name)


def test_inductor_compiled_block_matches_eager():
    from megatron_phi4.distributed.data_parallel import apply_compile
    from megatron_phi4.models.phi4.model import build_model

    eager = build_model(tiny_cfg(), "cpu", 0)
    compiled = build_model(tiny_cfg(), "cpu", 0)
    assert apply_compile(list(compiled.layers.values()), "inductor") == tiny_cfg().num_layers
    ids = make_lm_microbatches(1, seed=5)[0]["input_ids"]
    outs = []
    for model in (eager, compiled):
        logits = model(ids)
        logits.float().logsumexp(-1).mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_e, g_e), (out_c, g_c) = outs
    assert list(g_c) == list(g_e)
    # Inductor fuses and reorders fp32 reductions (RMSNorm, softmax): rounding-level differences.
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-6, msg=name)


def _fp8_steps(rank, world):
    from torch._dynamo.utils import counters

    from megatron_phi4.config import FP8Config, ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.losses import LMLoss

    cfg = tiny_cfg()
    cfg.fp8 = FP8Config(enabled=True, recipe="tensorwise")
    mbs = make_lm_microbatches(2, seed=6)
    out = {}
    for compile_ in (False, True):
        pcfg = ParallelConfig(mixed_precision="bf16", compile=compile_, compile_backend="aot_eager")
        engine = ParallelEngine(cfg, pcfg, ParallelDims.build(pcfg, model_cfg=cfg), seed=0)
        counters.clear()
        loss_fn = LMLoss()
        out[compile_] = (engine.forward_backward(mbs, loss_fn, engine.global_units(mbs, loss_fn))["loss"],
                         dict(counters["graph_break"]), counters["stats"]["unique_graphs"])
    return out


def test_fp8_blocks_compile_without_graph_breaks():
    """model.fp8 (torchao casts in a custom autograd function) must stay inside the compiled graphs:
    a graph break would leave the amax/scale/cast kernels eager and unfused on GPU."""
    out, = run_distributed(_fp8_steps, 1)
    (loss_e, _, _), (loss_c, breaks, graphs) = out[False], out[True]
    assert breaks == {} and graphs >= 1
    assert abs(loss_c - loss_e) <= 1e-6 * abs(loss_e)
