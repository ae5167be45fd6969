import glob
import importlib.util
import multiprocessing as mp
import os

import numpy as np
import pytest

from megatron_phi4.data.gpt_dataset import (
    GPTDataset, build_document_index, build_gpt_indices, build_pretrain_dataset,
    build_sample_index, packed_position_ids, select_documents, tokens_in)
from megatron_phi4.tokenizer import EOD_ID

from .conftest import make_docs, write_docs


def _reference_stream(docs, document_index):
    return np.concatenate([np.asarray(docs[d]) for d in document_index])


def _megatron_helpers():
    """megatron-core's compiled helpers, loaded without importing megatron.core (slow import)."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        so = glob.glob(os.path.join(loc, "core", "datasets", "helpers_cpp*.so"))
        if so:
            s = importlib.util.spec_from_file_location("helpers_cpp", so[0])
            m = importlib.util.module_from_spec(s)
            s.loader.exec_module(m)
            return m
    return None


def test_sample_index_matches_megatron_core_helpers():
    helpers = _megatron_helpers()
    if helpers is None:
        pytest.skip("megatron-core's compiled helpers not available")
    rng = np.random.default_rng(0)
    lens = rng.integers(0, 300, size=3000).astype(np.int32)
    lens[::7] = 0  # empty documents too
    docs = select_documents(lens)
    tpe = tokens_in(lens, docs)
    for S in (7, 64, 1000):
        for epochs in (1, 3):
            di = build_document_index(docs, epochs, seed=5)
            total = (epochs * tpe - 1) // S
            mine = build_sample_index(lens, di, S, total, chunk=777)
            ref = helpers.build_sample_idx_int64(lens, di, S, epochs, tpe, True, 1)
            np.testing.assert_array_equal(mine, ref)


def test_samples_are_the_packed_stream(docs_dataset):
    docs = make_docs(200, seed=1)
    ds = GPTDataset(docs_dataset("a", docs), seq_length=32, seed=3)
    S = 32
    stream = _reference_stream(docs, ds.document_index)
    assert len(ds) == (len(stream) - 1) // S
    seen = []
    for k in range(len(ds)):
        i = int(ds.shuffle_index[k])
        t = ds.get_tokens(k)
        assert t.dtype == np.int64 and t.shape == (S + 1,)
        np.testing.assert_array_equal(t, stream[i * S:i * S + S + 1])
        seen.append(i)
    assert sorted(seen) == list(range(len(ds)))  # every sample once: one epoch, each token once


def test_document_index_shuffled_per_epoch():
    docs = np.arange(1000, dtype=np.int32)
    di = build_document_index(docs, 3, seed=7)
    for e in range(3):
        part = di[e * 1000:(e + 1) * 1000]
        assert sorted(part) == list(range(1000))
        assert not np.array_equal(part, docs)
    assert not np.array_equal(di[:1000], di[1000:2000])
    np.testing.assert_array_equal(di, build_document_index(docs, 3, seed=7))
    assert not np.array_equal(di, build_document_index(docs, 3, seed=8))


def test_getitem_fields_and_positions(docs_dataset):
    docs = make_docs(50, seed=2, lo=2, hi=20)
    ds = GPTDataset(docs_dataset("a", docs), seq_length=40, seed=0)
    item = ds[3]
    tok, pos, doc = item["tokens"], item["position_ids"], item["document_ids"]
    assert tok.shape == (41,) and pos.shape == (40,) and doc.shape == (40,)
    assert str(tok.dtype) == "torch.int64" and str(pos.dtype) == "torch.int64"
    t = tok.numpy()[:-1]
    p, d = pos.numpy(), doc.numpy()
    assert p[0] == 0 and d[0] == 0
    for j in range(1, 40):
        if t[j - 1] == EOD_ID:
            assert p[j] == 0 and d[j] == d[j - 1] + 1
        else:
            assert p[j] == p[j - 1] + 1 and d[j] == d[j - 1]


def test_packed_position_ids_small():
    E = EOD_ID
    pos, doc = packed_position_ids(np.array([5, 6, E, 7, E, E, 8]))
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0]
    assert doc.tolist() == [0, 0, 0, 1, 1, 2, 3]


def test_long_document_filter(docs_dataset):
    docs = make_docs(300, seed=3, lo=1, hi=80)
    prefix = docs_dataset("a", docs)
    ds = GPTDataset(prefix, seq_length=16, seed=1, min_document_tokens=50)
    keep = {i for i, d in enumerate(docs) if len(d) > 50}
    assert set(np.asarray(ds.document_index).tolist()) == keep
    assert ds.num_documents == len(keep)
    stream = _reference_stream(docs, ds.document_index)
    for k in range(0, len(ds), 7):
        i = int(ds.shuffle_index[k])
        np.testing.assert_array_equal(ds.get_tokens(k), stream[i * 16:i * 16 + 17])
    with pytest.raises(ValueError, match="min_document_tokens"):
        GPTDataset(prefix, seq_length=16, min_document_tokens=10_000)


def test_multi_epoch_and_separate_final_epoch():
    lens = np.full(100, 10, dtype=np.int32)  # 1000 tokens per epoch
    S = 10
    per_epoch = (1000 - 1) // S  # 99
    # 2.1 epochs: the final epoch is < 80 % used -> shuffled separately, placed last
    out = build_gpt_indices(lens, S, seed=0, num_samples=210)
    n, total, epochs = out["meta"][:3]
    assert epochs == 3 and n == 210 and total == (3000 - 1) // S
    sans_final = (2000 - 1) // S
    first = out["shuffle_index"][:sans_final]
    assert sorted(first.tolist()) == list(range(sans_final))
    assert out["shuffle_index"][sans_final:].min() >= sans_final
    # 2.9 epochs: shuffled together
    out = build_gpt_indices(lens, S, seed=0, num_samples=290)
    assert out["meta"][5] == 0
    assert out["shuffle_index"][:sans_final].max() >= sans_final
    assert per_epoch == 99


def test_index_cache_hit_and_key(tmp_path, docs_dataset):
    docs = make_docs(100, seed=4)
    prefix = docs_dataset("a", docs)
    cache = str(tmp_path / "cache")
    a = GPTDataset(prefix, seq_length=16, seed=1, cache_dir=cache)
    entries = [e for e in os.listdir(cache) if e.startswith("gpt-") and not e.endswith(".lock")]
    assert len(entries) == 1
    assert not [e for e in os.listdir(cache) if e.startswith(".tmp")]
    stamp = os.path.getmtime(os.path.join(cache, entries[0], "sample_index.npy"))
    b = GPTDataset(prefix, seq_length=16, seed=1, cache_dir=cache)
    assert os.path.getmtime(os.path.join(cache, entries[0], "sample_index.npy")) == stamp
    assert isinstance(b.sample_index, np.memmap)
    np.testing.assert_array_equal(a.shuffle_index, b.shuffle_index)
    for k in range(len(a)):
        np.testing.assert_array_equal(a.get_tokens(k), b.get_tokens(k))
    GPTDataset(prefix, seq_length=16, seed=2, cache_dir=cache)
    GPTDataset(prefix, seq_length=17, seed=1, cache_dir=cache)
    GPTDataset(prefix, seq_length=16, seed=1, cache_dir=cache, num_samples=50)
    entries = [e for e in os.listdir(cache) if e.startswith("gpt-") and not e.endswith(".lock")]
    assert len(entries) == 4
    # rewriting the dataset changes its fingerprint -> new entry
    write_docs(tmp_path / "a", make_docs(100, seed=5))
    GPTDataset(prefix, seq_length=16, seed=1, cache_dir=cache)
    entries = [e for e in os.listdir(cache) if e.startswith("gpt-") and not e.endswith(".lock")]
    assert len(entries) == 5


def _build_in_child(args):
    prefix, cache = args
    ds = GPTDataset(prefix, seq_length=8, seed=9, cache_dir=cache)
    return np.asarray(ds.shuffle_index).tolist()


def test_concurrent_builders_one_entry(tmp_path, docs_dataset):
    prefix = docs_dataset("a", make_docs(3000, seed=6))
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        res = pool.map(_build_in_child, [(prefix, cache)] * 3)
    assert res[0] == res[1] == res[2]
    entries = [e for e in os.listdir(cache) if not e.endswith(".lock")]
    assert len(entries) == 1 and entries[0].startswith("gpt-")


def _spec(tmp_path, a, b, extra=""):
    p = tmp_path / "mix.yaml"
    p.write_text(f"""
sources:
  - name: web
    weight: 0.7
    paths: [{a}]
  - name: code
    weight: 0.3
    paths: [{b}]{extra}
""")
    return str(p)


def test_blended_pretrain_dataset(tmp_path, docs_dataset):
    a = docs_dataset("web", make_docs(300, seed=7, tag=1))
    b = docs_dataset("code", make_docs(100, seed=8, tag=2))
    cache = str(tmp_path / "cache")
    ds = build_pretrain_dataset(_spec(tmp_path, a, b), seq_length=16, num_samples=1000, seed=3,
                                cache_dir=cache)
    assert len(ds) == 1000
    ids = np.array([ds.locate(i)[0] for i in range(1000)])
    assert abs((ids == 0).mean() - 0.7) <= 0.001
    # code has ~1/3 of web's tokens but 3/7 of its weight: it is repeated (several epochs)
    code_ds = ds.datasets[1]
    assert code_ds.num_epochs > 1 and len(code_ds) == (ids == 1).sum()
    item = ds[5]
    assert set(item) >= {"tokens", "position_ids", "document_ids", "dataset_id"}
    # tokens of a sample come from its source (tag in the ten-thousands digit)
    for i in range(0, 1000, 37):
        t = ds[i]["tokens"].numpy()
        body = t[t != EOD_ID]
        assert np.all(body // 10_000 == ds.locate(i)[0] + 1)
    # pure function of (spec, seed, index)
    ds2 = build_pretrain_dataset(_spec(tmp_path, a, b), seq_length=16, num_samples=1000, seed=3,
                                 cache_dir=cache)
    for i in (0, 17, 999):
        assert ds[i]["tokens"].tolist() == ds2[i]["tokens"].tolist()
    ds3 = build_pretrain_dataset(_spec(tmp_path, a, b), seq_length=16, num_samples=1000, seed=4)
    assert any(ds[i]["tokens"].tolist() != ds3[i]["tokens"].tolist() for i in range(10))


def test_blended_long_doc_filter_from_spec(tmp_path, docs_dataset):
    a = docs_dataset("web", make_docs(300, seed=7, lo=1, hi=100, tag=1))
    b = docs_dataset("code", make_docs(300, seed=8, lo=1, hi=100, tag=2))
    ds = build_pretrain_dataset(_spec(tmp_path, a, b, "\n    min_document_tokens: 60"),
                                seq_length=32, num_samples=200, seed=0)
    code = ds.datasets[1]
    lens = code.dataset.sequence_lengths
    assert np.all(lens[np.asarray(code.document_index)] > 60)
    assert np.any(lens <= 60)
