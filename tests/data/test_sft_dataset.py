import json

import numpy as np
import pytest

from megatron_phi4.data.indexed import IndexedDatasetError, IndexedDatasetWriter
from megatron_phi4.data.sft_dataset import SFTDataset, pack_first_fit
from megatron_phi4.tokenizer import PAD_ID


def write_chat(prefix, convs):
    """convs: list of (tokens, mask) pairs -> PREFIX_tokens (int32) + PREFIX_loss_mask (uint8)."""
    with IndexedDatasetWriter(f"{prefix}_tokens", np.int32) as wt, \
            IndexedDatasetWriter(f"{prefix}_loss_mask", np.uint8) as wm:
        for t, m in convs:
            wt.add_document(np.asarray(t, np.int32))
            wm.add_document(np.asarray(m, np.uint8))
    return str(prefix)


def make_convs(n, seed=0, lo=3, hi=30):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(lo, hi))
        t = (i + 1) * 1000 + np.arange(L)          # token tells conversation and position
        m = (np.arange(L) >= L // 2).astype(np.uint8)  # second half = "assistant"
        out.append((t, m))
    return out


def test_first_fit_small():
    order, off = pack_first_fit(np.array([6, 5, 4, 3, 2, 9, 1]), capacity=10)
    bins = [order[off[b]:off[b + 1]].tolist() for b in range(len(off) - 1)]
    # 6 -> bin0(4 left); 5 -> bin1(5); 4 -> bin0(0); 3 -> bin1(2); 2 -> bin1(0); 9 -> bin2; 1 -> bin2
    assert bins == [[0, 2], [1, 3, 4], [5, 6]]
    # window of 1 open bin: next-fit
    order, off = pack_first_fit(np.array([6, 5, 4]), capacity=10, max_open_bins=1)
    assert [order[off[b]:off[b + 1]].tolist() for b in range(len(off) - 1)] == [[0], [1, 2]]


def test_packing_rows(tmp_path):
    convs = make_convs(60, seed=1)
    prefix = write_chat(tmp_path / "chat", convs)
    S = 63
    ds = SFTDataset(prefix, seq_length=S, seed=5)
    seen = []
    for i in range(len(ds)):
        tokens, mask, pos, doc = ds.get_arrays(i)
        assert len(tokens) == S + 1
        # split the row into conversations via document ids
        for d in np.unique(doc):
            sel = doc == d
            t = tokens[sel]
            if t[0] == PAD_ID:
                assert np.all(t == PAD_ID) and np.all(mask[sel] == 0)
                continue
            c = int(t[0] // 1000) - 1
            np.testing.assert_array_equal(t, convs[c][0])
            np.testing.assert_array_equal(mask[sel], convs[c][1])
            assert pos[sel].tolist() == list(range(len(t)))
            seen.append(c)
        item = ds[i]
        assert item["tokens"].shape == (S + 1,)
        assert item["loss_mask"].tolist() == mask[1:].tolist()   # aligned with labels
        assert item["position_ids"].tolist() == pos[:-1].tolist()
        assert item["document_ids"].tolist() == doc[:-1].tolist()
    assert sorted(seen) == list(range(60))  # every conversation exactly once, whole
    st = ds.packing_stats()
    assert st["fill"] > 0.8 and st["truncated_per_epoch"] == 0


def test_shuffle_deterministic_and_seeded(tmp_path):
    prefix = write_chat(tmp_path / "chat", make_convs(80, seed=2))
    a = SFTDataset(prefix, 40, seed=1)
    b = SFTDataset(prefix, 40, seed=1, cache_dir=str(tmp_path / "c"))
    c = SFTDataset(prefix, 40, seed=2)
    assert np.array_equal(a.items, b.items)
    assert not np.array_equal(a.items, c.items)
    b2 = SFTDataset(prefix, 40, seed=1, cache_dir=str(tmp_path / "c"))
    assert isinstance(b2.items, np.memmap) and np.array_equal(b2.items, a.items)


def test_truncation_counted(tmp_path):
    convs = make_convs(10, seed=3, lo=3, hi=10) + [(np.arange(100) + 99_000, np.ones(100))]
    prefix = write_chat(tmp_path / "chat", convs)
    ds = SFTDataset(prefix, seq_length=31, seed=0)
    assert ds.num_truncated == 1
    rows = [ds.get_arrays(i)[0] for i in range(len(ds))]
    long = [r for r in rows if r[0] == 99_000]
    assert len(long) == 1 and long[0].tolist() == list(range(99_000, 99_032))


def test_epochs_for_num_samples(tmp_path):
    prefix = write_chat(tmp_path / "chat", make_convs(30, seed=4))
    one = SFTDataset(prefix, 63, seed=0)
    more = SFTDataset(prefix, 63, seed=0, num_samples=3 * len(one))
    assert len(more) == 3 * len(one) and more.num_epochs >= 3
    assert np.array_equal(more.items[:30], one.items)   # epoch 0 unchanged
    assert not np.array_equal(more.items[30:60], one.items)


def test_mismatched_pair_rejected(tmp_path):
    prefix = write_chat(tmp_path / "chat", make_convs(5))
    with IndexedDatasetWriter(f"{tmp_path}/chat_loss_mask", np.uint8) as w:
        w.add_document(np.ones(3, np.uint8))
    with pytest.raises(IndexedDatasetError, match="chat_tokens"):
        SFTDataset(prefix, 32)


def test_with_preprocess_chat(tmp_path):
    """End to end with the chat preprocessor's real output."""
    pc = pytest.importorskip("megatron_phi4.data.preprocess_chat")
    src = tmp_path / "chat.jsonl"
    with open(src, "w") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i}+{i}?"},
                {"role": "assistant", "content": f"{2 * i}"}]}) + "\n")
    pc.preprocess_chat([str(src)], str(tmp_path / "out"))
    ds = SFTDataset(str(tmp_path / "out"), seq_length=128, seed=0)
    assert ds.num_conversations == 6
    item = ds[0]
    t = item["tokens"].numpy()
    lm = item["loss_mask"].numpy()
    labels = t[1:]
    assert lm.sum() > 0
    assert set(labels[lm == 1].tolist()) >= {100265}       # <|im_end|> of the answers is trained
    assert 100264 not in labels[lm == 1].tolist()           # <|im_start|> never is
    assert np.all(labels[labels == PAD_ID] == PAD_ID) and np.all(lm[labels == PAD_ID] == 0)
