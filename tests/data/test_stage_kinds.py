"""Stage data looks its kind up in DATA_KINDS: a registered kind is used with the shared sampler
order; an unknown one is a typed error naming the field and the allowed kinds."""
import pytest
import torch

from megatron_phi4.config import DataConfig
from megatron_phi4.data.sampler import PretrainSampler
from megatron_phi4.data.sources import SourceRequest, StageSource
from megatron_phi4.data.stage import build_stage_data, build_validation_data
from megatron_phi4.registry import DATA_KINDS, UnknownEntryError


class IndexSource(StageSource):
    """Sample i is a row of the value i (so a batch shows which indices it holds)."""

    def __init__(self, req: SourceRequest):
        self.size, self.S, self.validation = req.num_samples, req.seq_length, req.validation

    def get(self, i):
        return {"tokens": torch.full((self.S + 1,), i + (10_000 if self.validation else 0))}

    def collate(self, samples):
        t = torch.stack([s["tokens"] for s in samples])
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}

    def tokens_per_source(self, consumed):
        return {"index": consumed * self.S}


@pytest.fixture
def index_kind():
    DATA_KINDS.register("test_index", IndexSource)
    yield "test_index"
    DATA_KINDS._entries.pop("test_index")


def test_a_registered_kind_is_built_and_read_in_sampler_order(index_kind):
    cfg = DataConfig(kind=index_kind, seq_length=4, micro_batch_size=2, global_batch_size=8,
                     validation="yes")
    for dp in (1, 2, 4):
        for r in range(dp):
            d = build_stage_data(cfg, r, dp, 8, 3)  # resume after one step
            got = [mb["input_ids"][:, 0].tolist() for mb in d.next_global_batch()]
            want = list(PretrainSampler(16, 8, 2, r, dp))
            assert got == want, (dp, r)
            assert d.tokens_per_source() == {"index": 16 * 4}
        val = build_validation_data(cfg, 0, dp, eval_iters=1)
        assert val[0][0]["input_ids"][0, 0] == 10_000


def test_unknown_kind_names_the_field_and_the_allowed_kinds():
    cfg = DataConfig(kind="nope", seq_length=4, micro_batch_size=1, global_batch_size=1)
    with pytest.raises(UnknownEntryError, match=r"data\.kind: got 'nope', allowed: 'pretrain'"):
        build_stage_data(cfg, 0, 1, 0, 1)
