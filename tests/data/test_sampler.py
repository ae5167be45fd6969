import numpy as np
import pytest
import torch

from megatron_phi4.data.sampler import PretrainSampler, collate_lm, make_collate
from megatron_phi4.tokenizer import PAD_ID

EOD = 100257


def _run(total, consumed, mbs, dp, steps=None):
    """Per global step of mbs*dp samples: the samples each rank gets (list per rank)."""
    its = [iter(PretrainSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    out = []
    while True:
        try:
            step = [next(it) for it in its]
        except StopIteration:
            break
        out.append(step)
        if steps is not None and len(out) == steps:
            break
    return out


def test_megatron_semantics_contiguous_split():
    steps = _run(total=40, consumed=0, mbs=2, dp=3)
    assert steps[0] == [[0, 1], [2, 3], [4, 5]]
    assert steps[1] == [[6, 7], [8, 9], [10, 11]]
    assert len(steps) == 40 // 6  # drop_last
    assert len(PretrainSampler(40, 0, 2, 0, 3)) == 6


def test_resume_matches_uninterrupted_run():
    gbs = 12
    full = [i for step in _run(120, 0, 2, 3) for rank in step for i in rank]
    for k in (0, gbs, 5 * gbs):
        resumed = [i for step in _run(120, k, 2, 3) for rank in step for i in rank]
        assert resumed == full[k:]
    # per rank, too
    for r in range(3):
        full_r = [i for b in PretrainSampler(120, 0, 2, r, 3) for i in b]
        res_r = [i for b in PretrainSampler(120, 24, 2, r, 3) for i in b]
        assert res_r == full_r[24 // 3:]


def test_resume_with_different_dp_size():
    total, gbs = 480, 24
    first = _run(total, 0, mbs=2, dp=4, steps=5 * gbs // 8)     # 5 global batches on 4 ranks
    consumed = sum(len(b) for step in first for b in step)
    assert consumed == 5 * gbs
    rest = _run(total, consumed, mbs=3, dp=2)                     # resume on 2 ranks, mbs 3
    stream = [i for step in first + rest for b in step for i in b]
    assert stream == list(range(total))
    # global batches hold the same samples under any layout
    for layout in [(1, 1), (2, 6), (4, 3), (3, 8)]:
        steps = _run(total, 0, *layout)
        flat = [i for step in steps for b in step for i in b]
        gb = [sorted(flat[j:j + gbs]) for j in range(0, len(flat), gbs)]
        assert gb[2] == list(range(2 * gbs, 3 * gbs))


def test_resume_dataset_stream_is_identical():
    """With a deterministic dataset the resumed run sees the very same samples."""
    data = np.random.default_rng(0).integers(0, 1000, size=(96, 9))

    def samples(consumed, dp):
        out = []
        for r in range(dp):
            for b in PretrainSampler(96, consumed, 2, r, dp):
                out.extend((b[0] + j, data[i].tolist()) for j, i in enumerate(b))
        return [x for _, x in sorted(out)]

    full = samples(0, 4)
    assert samples(32, 2) == full[32:]


def test_sampler_validation():
    with pytest.raises(ValueError):
        PretrainSampler(10, 11, 1, 0, 1)
    with pytest.raises(ValueError):
        PretrainSampler(10, 0, 1, 2, 2)
    last = list(PretrainSampler(10, 0, 2, 1, 2, drop_last=False))
    assert last[-1] == [9]


def test_collate_lm():
    toks = torch.tensor([[1, 2, EOD, 3, 4, PAD_ID], [5, 6, 7, 8, 9, 10]])
    samples = [{"tokens": t, "position_ids": torch.arange(5), "document_ids": torch.zeros(5)}
               for t in toks]
    b = collate_lm(samples)
    assert b["input_ids"].tolist() == [[1, 2, EOD, 3, 4], [5, 6, 7, 8, 9]]
    assert b["labels"].tolist() == [[2, EOD, 3, 4, PAD_ID], [6, 7, 8, 9, 10]]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b["position_ids"].dtype == torch.long and b["document_ids"].dtype == torch.long
    b = make_collate(eod_mask_loss=True)(samples)
    assert b["loss_mask"][0].tolist() == [1, 1, 0, 1, 0]
    b = collate_lm(samples, extra_mask=lambda x, y: y != 7)
    assert b["loss_mask"][1].tolist() == [1, 0, 1, 1, 1]
    # own loss_mask (SFT) is combined; defaults for missing position/document ids
    b = collate_lm([{"tokens": toks[1], "loss_mask": torch.tensor([0, 0, 1, 1, 1])}])
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4]]


def test_build_dataloader_over_dataset():
    from megatron_phi4.data.sampler import build_dataloader
    data = [{"tokens": torch.arange(i, i + 9)} for i in range(40)]
    dl = build_dataloader(data, consumed_samples=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    batches = list(dl)
    assert len(batches) == (40 - 8) // 4
    assert batches[0]["input_ids"][:, 0].tolist() == [10, 11]
    assert batches[0]["labels"].shape == (2, 8)


def test_resume_blended_pretrain_stream_across_dp_change(tmp_path):
    """End to end: mixture -> blended packed dataset -> loaders; stop after 3 global batches on
    4 ranks, resume on 2 ranks from a fresh build (cache hit): same token stream as one run."""
    from megatron_phi4.data.gpt_dataset import build_pretrain_dataset
    from megatron_phi4.data.sampler import build_dataloader

    from .conftest import make_docs, write_docs
    a = write_docs(tmp_path / "web", make_docs(200, seed=1, tag=1))
    b = write_docs(tmp_path / "code", make_docs(200, seed=2, tag=2))
    spec = tmp_path / "mix.yaml"
    spec.write_text(f"sources:\n  - {{name: web, weight: 2, paths: [{a}]}}\n"
                    f"  - {{name: code, weight: 1, paths: [{b}]}}\n")
    gbs, total = 16, 96
    cache = str(tmp_path / "cache")

    def run(consumed, mbs, dp, steps=None):
        ds = build_pretrain_dataset(str(spec), seq_length=16, num_samples=total, seed=11,
                                    cache_dir=cache)
        loaders = [iter(build_dataloader(ds, consumed, mbs, r, dp)) for r in range(dp)]
        rows = []
        n = 0
        while steps is None or n < steps:
            try:
                batches = [next(it) for it in loaders]
            except StopIteration:
                break
            for bt in batches:
                rows.extend(bt["input_ids"].tolist())
            n += 1
        return rows

    full = run(0, 2, 1)
    assert len(full) == total
    first = run(0, 2, 4, steps=3 * gbs // 8)
    rest = run(3 * gbs, 4, 2)
    assert first + rest == full
