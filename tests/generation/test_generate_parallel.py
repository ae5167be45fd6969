"""generate() under tensor parallelism (TP=2 on gloo equals one process) and the helpers that
spread work over data-parallel ranks (forked gloo ranks: tests/distributed_utils.py)."""
from __future__ import annotations

import torch

from megatron_phi4.config import model_preset
from tests.distributed_utils import run_distributed

CFG = model_preset("tiny", num_layers=2, max_seq_length=256)
PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
SAMPLED = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, num_samples=3, seed=11)


def _model_state():
    from megatron_phi4.models.phi4.model import build_model

    m = build_model(CFG, "cpu", seed=0).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)  # peaked distributions: sampling differences would show
    return m


def _stop_id(model):
    from megatron_phi4.generation import generate

    return generate(model, PROMPTS, stop_token_ids=[], **SAMPLED)[1][0].token_ids[4]


def _as_lists(results):
    return [[(s.token_ids, s.logprobs, s.finish_reason) for s in p] for p in results]


def _tp_rank(rank, world, state, stop):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.engine import ParallelEngine
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.generation import generate

    pcfg = ParallelConfig(tp=2, dp_shard="none")
    dims = ParallelDims.build(pcfg, model_cfg=CFG)
    engine = ParallelEngine(CFG, pcfg, dims, full_state_dict=state)
    model = engine.model_parts[0].eval()
    assert model.lm_head.out_features == CFG.vocab_size // 2  # really vocab-sharded
    greedy = generate(model, PROMPTS, max_new_tokens=16, num_samples=2, stop_token_ids=[])
    sampled = generate(model, PROMPTS, stop_token_ids=[stop], **SAMPLED)
    torch.manual_seed(100 + rank)  # unseeded: the TP ranks must still agree
    unseeded = generate(model, PROMPTS, max_new_tokens=8, temperature=1.0)
    return _as_lists(greedy), _as_lists(sampled), _as_lists(unseeded)


def _close(a, b, tol=1e-5):
    for pa, pb in zip(a, b):
        for (ta, la, fa), (tb, lb, fb) in zip(pa, pb):
            assert ta == tb and fa == fb
            assert max((abs(x - y) for x, y in zip(la, lb)), default=0.0) <= tol


def test_tp2_generates_the_tokens_of_one_process():
    from megatron_phi4.generation import generate

    model = _model_state()
    stop = _stop_id(model)
    want_greedy = _as_lists(generate(model, PROMPTS, max_new_tokens=16, num_samples=2, stop_token_ids=[]))
    want_sampled = _as_lists(generate(model, PROMPTS, stop_token_ids=[stop], **SAMPLED))
    assert any(f == "stop" for p in want_sampled for _, _, f in p)
    results = run_distributed(_tp_rank, 2, model.state_dict(), stop, timeout=300)
    for greedy, sampled, unseeded in results:
        _close(greedy, want_greedy)
        _close(sampled, want_sampled)
    assert [t for p in results[0][2] for t, _, _ in p] == [t for p in results[1][2] for t, _, _ in p]


def _dp_rank(rank, world, items):
    from megatron_phi4.generation import gather_items, map_over_ranks, shard_items

    mine = shard_items(items)
    gathered = gather_items([(i, (x, rank)) for i, x in mine], len(items))
    mapped = map_over_ranks(lambda x: x * 10, items)
    return [i for i, _ in mine], gathered, mapped


def test_work_is_spread_over_data_parallel_ranks_and_gathered_in_order():
    items = list(range(7))
    results = run_distributed(_dp_rank, 2, items, timeout=120)
    assert results[0][0] == [0, 2, 4, 6] and results[1][0] == [1, 3, 5]
    for _, gathered, mapped in results:
        assert gathered == [(i, i % 2) for i in items]
        assert mapped == [10 * i for i in items]
