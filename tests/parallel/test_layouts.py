"""Layout validation fails before any collective, with a message naming the field; stage split."""

import pytest
import torch.distributed as dist

from megatron_phi4.config import ConfigError, ModelConfig, ParallelConfig, model_preset
from megatron_phi4.distributed.parallel_dims import ParallelDims, init_distributed
from megatron_phi4.distributed.pipeline import split_layers, stages_of_rank


@pytest.mark.parametrize("kwargs,world,match", [
    (dict(tp=4), 8, r"tp: tensor-parallel size 4 does not divide model.num_kv_heads=10.*\[1, 2, 5, 10\]"),
    (dict(tp=3), 6, r"does not divide model.num_attention_heads=40"),
    (dict(tp=2, pp=2, dp=3), 8, r"tp \* pp \* dp = 2\*2\*3 = 12 != world size 8"),
    (dict(tp=2, pp=3), 8, r"world size 8 is not divisible by tp \* pp = 6"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=1), 2, r"interleaved_1f1b needs virtual_stages >= 2"),
    (dict(pp=2, virtual_stages=2), 2, r"virtual_stages: 2 model chunks per rank need pp_schedule"),
    (dict(sequence_parallel=True), 2, r"sequence_parallel: .*needs tp > 1"),
    (dict(pp=2, pp_schedule="zero_bubble", virtual_stages=2), 2, r"pp_schedule: 'zero_bubble' .* dp_shard 'none'"),
    (dict(pp=41), 41, r"41 stages but the model has only 40 layers"),
    (dict(pp=2, pp_layers_per_stage=[30, 9]), 2, r"sums to 39"),
])
def test_invalid_layouts_fail_without_process_group(kwargs, world, match):
    cfg = ModelConfig()  # Phi-4 14B: 40 heads, 10 KV heads, 40 layers
    with pytest.raises(ConfigError, match=match):
        ParallelDims.build(ParallelConfig(**kwargs), world_size=world, rank=0, model_cfg=cfg)
    assert not dist.is_initialized()


def test_init_distributed_validates_before_rendezvous(monkeypatch):
    # A rendezvous on this address would hang; validation must fail first.
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")
    with pytest.raises(ConfigError, match="does not divide model.num_kv_heads=10"):
        init_distributed(ParallelConfig(tp=4), ModelConfig())
    assert not dist.is_initialized()


def test_valid_phi4_layouts():
    cfg = ModelConfig()
    for tp in (1, 2, 5, 10):
        ParallelConfig(tp=tp, pp=2).validate(cfg, 2 * tp * 4)


def test_split_layers():
    assert split_layers(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_layers(8, 4, layers_per_stage=[1, 3, 3, 1]) == [[0], [1, 2, 3], [4, 5, 6], [7]]
    # Charging the embedding and the head as 2 layers each moves layers to the middle stages.
    counts = [len(s) for s in split_layers(40, 4, embedding_cost=2.0, head_cost=2.0)]
    assert sum(counts) == 40 and counts[0] < counts[1] and counts[3] < counts[2]
    assert max(c + (2 if i in (0, 3) else 0) for i, c in enumerate(counts)) == 11
    flat = [i for s in split_layers(40, 8, embedding_cost=1, head_cost=3) for i in s]
    assert flat == list(range(40))
    assert stages_of_rank(1, 4, 2) == [1, 5]


def test_tiny_preset_layouts():
    cfg = model_preset("tiny")
    with pytest.raises(ConfigError, match="num_kv_heads=2"):
        ParallelConfig(tp=4).validate(cfg, 4)


def _init_from_env(rank, world):
    from megatron_phi4.distributed.parallel_dims import init_distributed

    dims = init_distributed(ParallelConfig(tp=2, pp=2, timeout_minutes=1), model_preset("tiny", num_layers=4))
    ranks = {d: dist.get_process_group_ranks(getattr(dims, f"{d}_group")) for d in ("tp", "dp", "pp")}
    out = (dims.pp_rank, dims.dp_rank, dims.tp_rank, dims.dp, ranks, dist.get_backend())
    dist.destroy_process_group()
    return out


def test_init_distributed_layout_tp_fastest():
    from tests.distributed_utils import run_distributed

    res = run_distributed(_init_from_env, 4, init_process_group=False)
    assert [r[:3] for r in res] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert res[0][3] == 1 and res[0][5] == "gloo"
    assert res[1][4] == {"tp": [0, 1], "dp": [1], "pp": [1, 3]}
