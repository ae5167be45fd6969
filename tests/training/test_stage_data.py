"""StageData: resumable, DP-size-invariant global batches; per-source token accounting; preference
layout; validation sets; the offline sample data."""
import json
import math
import os

import pytest
import torch

from megatron_phi4.config import DataConfig, LossConfig, StageConfig
from megatron_phi4.data.stage import (
    build_stage_data,
    build_validation_data,
    global_batch_size_at,
    num_samples_for,
)

SEQ = 64
MBS = 2
GBS = 8
STEPS = 6


def _stage(kind, sample_data, tmp_path, **kw):
    p = sample_data
    loss = "lm"
    if kind == "pretrain":
        d = dict(mixture=p["pretrain_mixture"], validation=p["pretrain_validation"])
    elif kind == "midtrain":
        kind = "pretrain"
        d = dict(mixture=p["midtrain_mixture"], validation=p["midtrain_validation"])
    elif kind == "sft":
        d = dict(paths=[p["sft"]], validation=p["sft_validation"])
    elif kind == "dpo1":
        kind, loss = "preference", "dpo"
        d = dict(paths=[p["dpo1"]], validation=p["dpo1_validation"])
    elif kind == "dpo2":
        kind, loss = "preference", "dpo"
        d = dict(paths=[p["dpo2"]], validation=p["dpo2_validation"])
    elif kind == "synthetic":
        d = dict(validation="heldout")
    elif kind == "synthetic_dpo":
        kind, loss = "synthetic", "dpo"
        d = dict(validation="heldout")
    else:
        raise ValueError(kind)
    d.update(kw)
    data = DataConfig(kind=kind, seq_length=SEQ, micro_batch_size=MBS, global_batch_size=GBS,
                      cache_dir=str(tmp_path / "cache"), seed=7, **d)
    return StageConfig(name="s", data=data, loss=LossConfig(type=loss), train_steps=STEPS,
                       eval_iters=2)


def _rows(mb):
    """Per-sample rows of a micro-batch (preference: pair i = chosen row i + rejected row B+i)."""
    x = mb["input_ids"]
    if "weight" in mb:
        B = x.shape[0] // 2
        return [torch.cat([x[i], x[B + i]]) for i in range(B)]
    return list(x)


def _global(stage, dp_size, consumed=0, steps=1, num_steps=STEPS, **kw):
    """Global batches (list of per-sample rows in global order) for ``steps`` steps."""
    datas = [build_stage_data(stage, r, dp_size, consumed, num_steps, vocab_size=512, **kw)
             for r in range(dp_size)]
    out = []
    for _ in range(steps):
        per_rank = [d.next_global_batch() for d in datas]
        rows = []
        for j in range(len(per_rank[0])):
            for r in range(dp_size):
                rows += _rows(per_rank[r][j])
        out.append(torch.stack(rows))
    return out, datas


KINDS = ["pretrain", "midtrain", "sft", "dpo1", "dpo2", "synthetic", "synthetic_dpo"]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_and_dp_change_give_the_same_global_batches(kind, sample_data, tmp_path):
    stage = _stage(kind, sample_data, tmp_path)
    ref, datas = _global(stage, 2, steps=4)
    assert datas[0].consumed_samples == 4 * GBS
    # resume after 2 steps (global consumed samples), same DP size and a different one
    for dp in (1, 2, 4):
        got, ds = _global(stage, dp, consumed=2 * GBS, steps=2)
        assert ds[0].consumed_samples == 4 * GBS
        for a, b in zip(got, ref[2:]):
            assert torch.equal(a, b), (kind, dp)
    # from the start with DP=4 (one micro-batch per rank per step)
    got, _ = _global(stage, 4, steps=1)
    assert torch.equal(got[0], ref[0])
    # consecutive steps differ (the stream moves on)
    assert not torch.equal(ref[0], ref[1])


@pytest.mark.parametrize("kind", ["pretrain", "sft", "synthetic"])
def test_lm_microbatch_layout(kind, sample_data, tmp_path):
    d = build_stage_data(_stage(kind, sample_data, tmp_path), 1, 2, 0, STEPS, vocab_size=512)
    mbs = d.next_global_batch()
    assert len(mbs) == GBS // (MBS * 2)
    for mb in mbs:
        assert set(mb) == {"input_ids", "labels", "loss_mask", "position_ids", "document_ids"}
        for k, v in mb.items():
            assert v.shape == (MBS, SEQ), k
        assert mb["input_ids"].dtype == torch.long and mb["loss_mask"].dtype == torch.float32
        assert torch.equal(mb["input_ids"][:, 1:], mb["labels"][:, :-1])
    if kind == "synthetic":
        assert int(mbs[0]["input_ids"].max()) < 512


@pytest.mark.parametrize("kind", ["dpo1", "dpo2", "synthetic_dpo"])
def test_preference_microbatch_layout(kind, sample_data, tmp_path):
    d = build_stage_data(_stage(kind, sample_data, tmp_path), 0, 2, 0, STEPS)
    mbs = d.next_global_batch()
    assert len(mbs) == GBS // (MBS * 2)
    for mb in mbs:
        for k in ("input_ids", "labels", "loss_mask", "position_ids", "document_ids"):
            assert mb[k].shape == (2 * MBS, SEQ), k  # fixed length: same shape every micro-batch
        assert mb["weight"].shape == (MBS,)
        m = mb["loss_mask"]
        for i in range(MBS):
            c, r = i, MBS + i
            first = int(m[c].nonzero()[0])
            assert int(m[r].nonzero()[0]) == first  # completion starts after the same prompt
            assert torch.equal(mb["input_ids"][c, :first + 1], mb["input_ids"][r, :first + 1])
            if kind == "dpo1":  # pivotal-token pairs: one completion token, the two differ
                assert m[c].sum() == 1 and m[r].sum() == 1
                assert mb["labels"][c, first] != mb["labels"][r, first]
        if kind == "dpo2":
            assert ((mb["weight"] >= 0.5) & (mb["weight"] <= 1.0)).all()


def test_preference_reference_logps_pass_through(tmp_path):
    recs = [{"prompt_ids": [1, 2, 3 + i], "chosen_ids": [4, 5], "rejected_ids": [6],
             "weight": 0.5 + i / 100, "ref_chosen_logp": -1.0 - i, "ref_rejected_logp": -2.0 - i}
            for i in range(10)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    stage = StageConfig(name="d", data=DataConfig(kind="preference", paths=[str(f)], seq_length=16,
                                                  micro_batch_size=2, global_batch_size=4),
                        loss=LossConfig(type="dpo"), train_steps=5)
    d = build_stage_data(stage, 0, 1, 0, 5)
    seen = []
    for _ in range(5):  # 20 pairs over 10 records: two epochs, each a permutation
        for mb in d.next_global_batch():
            assert mb["input_ids"].shape == (4, 16)
            for i in range(2):
                k = int(mb["input_ids"][i, 2]) - 3
                seen.append(k)
                assert mb["ref_chosen_logp"][i] == -1.0 - k
                assert mb["ref_rejected_logp"][i] == -2.0 - k
                assert mb["weight"][i] == pytest.approx(0.5 + k / 100)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    with pytest.raises(StopIteration):
        d.next_global_batch()
    # tokens per source: (2 * prompt + chosen + rejected) per pair
    assert d.tokens_per_source() == {"preference": 20 * (6 + 2 + 1)}


def test_tokens_per_source_follows_the_blend(sample_data, tmp_path):
    from megatron_phi4.data.mixture import MixtureSpec
    stage = _stage("pretrain", sample_data, tmp_path)
    spec = MixtureSpec.from_yaml(sample_data["pretrain_mixture"])
    d0 = build_stage_data(stage, 0, 2, 0, STEPS)
    d1 = build_stage_data(stage, 1, 2, 0, STEPS)
    assert sum(d0.tokens_per_source().values()) == 0
    for step in range(1, 4):
        d0.next_global_batch()
        d1.next_global_batch()
        tps = d0.tokens_per_source()
        assert tps == d1.tokens_per_source()  # identical on every rank
        assert sum(tps.values()) == d0.consumed_samples * SEQ == d0.consumed_tokens()
        # matches the dataset each consumed sample really came from
        ids = [d0.source.get(i)["dataset_id"] for i in range(d0.consumed_samples)]
        names = spec.names
        want = {n: 0 for n in names}
        for i in ids:
            want[names[d0.source.ds.source_of[i]]] += SEQ
        assert tps == want
        # and the mixture weights (each source within one sample of its share)
        for n, w in zip(names, spec.normalized_weights()):
            assert abs(tps[n] / SEQ - w * d0.consumed_samples) <= 1.0
    # after resume, from consumed_samples alone
    r = build_stage_data(stage, 0, 4, d0.consumed_samples, STEPS)
    assert r.tokens_per_source() == d0.tokens_per_source()


def test_batch_size_ramp(sample_data, tmp_path):
    stage = _stage("synthetic", sample_data, tmp_path, batch_size_ramp=[4, 2, 24])
    data = stage.data
    seq = []
    c = 0
    for _ in range(8):
        g = global_batch_size_at(data, c)
        seq.append(g)
        c += g
    assert seq == [4, 4, 4, 6, 6, 8, 8, 8]
    assert num_samples_for(data, 8) == sum(seq)
    ref, datas = _global(stage, 1, steps=8, num_steps=8)
    assert [len(x) for x in ref] == seq
    assert datas[0].consumed_samples == sum(seq) == datas[0].num_samples
    assert datas[0].step == 8
    with pytest.raises(StopIteration):
        datas[0].next_global_batch()
    # DP=2 needs every ramp size to be a multiple of mbs * dp = 4
    stage = _stage("synthetic", sample_data, tmp_path, batch_size_ramp=[4, 4, 16])
    ref, _ = _global(stage, 1, steps=6)
    assert [len(x) for x in ref] == [4, 4, 4, 4, 8, 8]
    got, ds = _global(stage, 2, consumed=8, steps=4)  # resume after 2 steps with DP=2
    assert all(torch.equal(a, b) for a, b in zip(got, ref[2:]))
    assert ds[0].num_microbatches_at(8) == 1 and ds[0].num_microbatches_at(16) == 2
    # a ramp size that does not split over the DP ranks is an error, not a silent change
    bad = _stage("synthetic", sample_data, tmp_path, batch_size_ramp=[4, 2, 24])
    d = build_stage_data(bad, 0, 2, 12, STEPS)
    with pytest.raises(ValueError, match="divisible"):
        d.next_global_batch()


def test_validation_data_is_deterministic_and_dp_split(sample_data, tmp_path):
    for kind in ("pretrain", "midtrain", "sft", "dpo1", "synthetic"):
        stage = _stage(kind, sample_data, tmp_path)
        a = build_validation_data(stage, 0, 1, vocab_size=512)
        b = build_validation_data(stage, 0, 1, vocab_size=512)
        assert len(a) == stage.eval_iters == 2
        flat_a = [torch.stack(sum((_rows(mb) for mb in gb), [])) for gb in a]
        flat_b = [torch.stack(sum((_rows(mb) for mb in gb), [])) for gb in b]
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))
        assert all(len(x) == GBS for x in flat_a)
        # DP=2: concatenating the ranks' micro-batches (micro-step major) gives the same set
        r = [build_validation_data(stage, k, 2, vocab_size=512) for k in range(2)]
        for it in range(2):
            rows = []
            for j in range(len(r[0][it])):
                for k in range(2):
                    rows += _rows(r[k][it][j])
            assert torch.equal(torch.stack(rows), flat_a[it]), kind
        # held out: not the training stream
        tr = build_stage_data(stage, 0, 1, 0, STEPS, vocab_size=512).next_global_batch()
        assert not torch.equal(torch.stack(sum((_rows(mb) for mb in tr), [])), flat_a[0])
    stage = _stage("pretrain", sample_data, tmp_path, validation=None)
    assert build_validation_data(stage, 0, 1) is None


def test_sample_data(sample_data):
    from megatron_phi4.data.indexed import IndexedDataset
    from megatron_phi4.data.mixture import MixtureSpec
    from megatron_phi4.demo.sample_data import (
        LONG_DOCUMENT_TOKENS,
        prepare_sample_data,
        unigram_entropy,
    )
    for k, p in sample_data.items():
        if k.startswith("sft"):
            assert os.path.exists(p + "_tokens.idx") and os.path.exists(p + "_loss_mask.idx"), k
        else:
            assert os.path.exists(p), k
    man = json.load(open(sample_data["manifest"]))
    train_tokens = sum(v["train"] for k, v in man["tokens"].items() if k != "long")
    assert 500_000 < train_tokens < 3_000_000
    spec = MixtureSpec.from_yaml(sample_data["pretrain_mixture"], check_paths=True)
    assert spec.names == ["code", "docs", "synthetic"]
    val = MixtureSpec.from_yaml(sample_data["pretrain_validation"], check_paths=True)
    assert not set(spec.sources[0].prefixes) & set(val.sources[0].prefixes)
    long = MixtureSpec.from_yaml(sample_data["midtrain_validation"], check_paths=True)
    lens = IndexedDataset(long.sources[0].prefixes[0]).sequence_lengths
    assert (lens > LONG_DOCUMENT_TOKENS).sum() >= 5
    h = unigram_entropy(sample_data["pretrain_validation"])
    assert h == pytest.approx(man["pretrain_validation_unigram_entropy"])
    assert 3.0 < h < math.log(100352)
    # preference files: token ids, PTS completions of one token
    r1 = [json.loads(x) for x in open(sample_data["dpo1"])]
    assert all(len(r["chosen_ids"]) == 1 and r["chosen_ids"] != r["rejected_ids"] for r in r1)
    r2 = [json.loads(x) for x in open(sample_data["dpo2"])]
    assert all(0.5 <= r["weight"] <= 1.0 and r["chosen_ids"][-1] == 100265 for r in r2)
    # idempotent: a second call reuses the directory
    mtime = os.path.getmtime(sample_data["manifest"])
    assert prepare_sample_data(sample_data["root"]) == sample_data
    assert os.path.getmtime(sample_data["manifest"]) == mtime
