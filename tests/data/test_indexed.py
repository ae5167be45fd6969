"""Our .bin/.idx writer/reader against megatron-core's IndexedDataset (format compatibility)."""
import os
import struct

import numpy as np
import pytest
import torch

# Deliberately not skipped when missing: compatibility with megatron-core is the point.
from megatron.core.datasets import indexed_dataset as mcore

from megatron_phi4.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    merge_indexed,
    read_index,
)
from megatron_phi4.tokenizer import Phi4Tokenizer

TEXTS = ["Hello world", "", "def f(x):\n    return x  # <|endoftext|>", "日本語 🙂 " * 20, "a"]


@pytest.fixture(scope="module")
def tok():
    return Phi4Tokenizer()


def _docs(n=50, seed=0, hi=100352):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, hi, int(k)).astype(np.int32) for k in rng.integers(0, 40, n)]


def test_megatron_reads_ours_exact_cl100k_ids(tmp_path, tok):
    import tiktoken

    # plain cl100k_base (ranks + its own <|endoftext|>), independent of Phi4Tokenizer's setup
    pat = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
           r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
    ref = tiktoken.Encoding(name="cl100k_ref", pat_str=pat,
                            mergeable_ranks=tok.encoding._mergeable_ranks,
                            special_tokens={"<|endoftext|>": 100257})
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix) as w:
        for t in TEXTS:
            w.add_document(tok.encode(t) + [tok.eod_id])
    ds = mcore.IndexedDataset(prefix)
    assert len(ds) == len(TEXTS)
    assert list(ds.document_indices) == list(range(len(TEXTS) + 1))
    assert ds.index.dtype == np.int32
    for i, t in enumerate(TEXTS):
        assert ds[i].tolist() == ref.encode_ordinary(t) + [100257]
        assert ds.get(i, offset=1, length=None).tolist() == (ref.encode_ordinary(t) + [100257])[1:]
    # slices through megatron too
    assert [a.tolist() for a in ds[1:3]] == [ds[1].tolist(), ds[2].tolist()]


def test_byte_identical_to_megatron_builder(tmp_path):
    docs = _docs()
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    with IndexedDatasetWriter(ours) as w:
        for d in docs:
            w.add_document(d)
    b = mcore.IndexedDatasetBuilder(theirs + ".bin", dtype=np.int32)
    for d in docs:
        b.add_item(torch.from_numpy(d))
        b.end_document()
    b.finalize(theirs + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint8, np.int64])
def test_we_read_megatron_builder(tmp_path, dtype):
    hi = np.iinfo(dtype).max if np.dtype(dtype).itemsize < 4 else 100352
    docs = _docs(30, seed=1, hi=hi)
    prefix = str(tmp_path / "mc")
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    # one multi-sequence document, then single-sequence ones
    b.add_document(torch.from_numpy(np.concatenate(docs[:3]).astype(np.int64)),
                   [len(d) for d in docs[:3]])
    for d in docs[3:]:
        b.add_item(torch.from_numpy(d.astype(np.int64)))
        b.end_document()
    b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(docs) and ds.num_documents == len(docs) - 2
    assert ds.document_indices.tolist() == [0] + list(range(3, len(docs) + 1))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d.astype(dtype).tolist()
        assert isinstance(ds[i], np.ndarray) and type(ds[i]) is np.ndarray
    assert ds.sequence_lengths.dtype == np.int32
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.get(5, 2, 3).tolist() == docs[5][2:5].astype(dtype).tolist()


def test_writer_api_variants_identical(tmp_path):
    docs = _docs(200, seed=2)
    a, b, c = (str(tmp_path / n) for n in "abc")
    with IndexedDatasetWriter(a) as w:
        for d in docs:
            w.add_document(d.tolist())
    with IndexedDatasetWriter(b, index_memory_entries=7) as w:  # exercises spilling
        w.add_documents(np.concatenate(docs[:120]), [len(d) for d in docs[:120]])
        for d in docs[120:]:
            w.add_item(d)
            w.end_document()
    with IndexedDatasetWriter(c, index_memory_entries=5) as w:
        w.add_index(a)
    for p in (b, c):
        for ext in (".bin", ".idx"):
            assert open(a + ext, "rb").read() == open(p + ext, "rb").read()
    assert sorted(os.listdir(tmp_path)) == sorted(f"{p}{e}" for p in "abc" for e in (".bin", ".idx"))


def test_writer_atomic_and_discards_on_error(tmp_path):
    prefix = str(tmp_path / "x")
    w = IndexedDatasetWriter(prefix)
    w.add_document([1, 2, 3])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    w.finalize()
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "y"), index_memory_entries=2) as w:
            for _ in range(10):
                w.add_document([4, 5])
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]
    with pytest.raises(IndexedDatasetError, match="fit"):
        IndexedDatasetWriter(str(tmp_path / "z"), dtype=np.uint16).add_document([70000])


def test_empty_dataset(tmp_path):
    prefix = str(tmp_path / "e")
    with IndexedDatasetWriter(prefix):
        pass
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.document_indices.tolist() == [0]
    # (megatron-core itself cannot mmap a 0-byte .bin; merging empty parts is fine)
    assert read_index(prefix).data_nbytes == 0


def _write(prefix, docs):
    with IndexedDatasetWriter(prefix) as w:
        for d in docs:
            w.add_document(d)


def test_truncated_bin(tmp_path):
    prefix = str(tmp_path / "t")
    _write(prefix, _docs(10))
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(IndexedDatasetError, match=r"t\.bin.*truncated") as ei:
        IndexedDataset(prefix)
    assert str(size) in str(ei.value) and str(size - 4) in str(ei.value)


def test_mismatched_pair(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, _docs(10, seed=3))
    _write(b, _docs(12, seed=4))
    os.replace(b + ".idx", a + ".idx")  # a.bin with b.idx
    with pytest.raises(IndexedDatasetError, match=r"a\.bin.*(mismatched|truncated|longer)"):
        IndexedDataset(a)


def test_truncated_and_corrupt_idx(tmp_path):
    prefix = str(tmp_path / "c")
    _write(prefix, _docs(10, seed=5))
    raw = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(raw[:-8])
    with pytest.raises(IndexedDatasetError, match=r"c\.idx.*truncated"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(b"XXXXXXXXX" + raw[9:])
    with pytest.raises(IndexedDatasetError, match="bad magic"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    with pytest.raises(IndexedDatasetError, match="version"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(raw[:17] + bytes([42]) + raw[18:])
    with pytest.raises(IndexedDatasetError, match="dtype code 42"):
        IndexedDataset(prefix)
    # pointer not consistent with lengths
    hdr = 34
    n = struct.unpack("<Q", raw[18:26])[0]
    p_off = hdr + 4 * n + 8 * 3
    bad = bytearray(raw)
    bad[p_off:p_off + 8] = struct.pack("<q", 12345)
    open(prefix + ".idx", "wb").write(bytes(bad))
    with pytest.raises(IndexedDatasetError, match="pointer"):
        IndexedDataset(prefix)
    os.remove(prefix + ".idx")
    with pytest.raises(IndexedDatasetError, match="missing"):
        IndexedDataset(prefix)


def test_merge(tmp_path):
    parts = [_docs(20, seed=s) for s in range(3)]
    prefixes = []
    for i, docs in enumerate(parts):
        p = str(tmp_path / f"p{i}")
        _write(p, docs)
        prefixes.append(p)
    _write(str(tmp_path / "empty"), [])
    prefixes.insert(1, str(tmp_path / "empty"))
    out = str(tmp_path / "merged")
    merge_indexed(prefixes, out)
    direct = str(tmp_path / "direct")
    _write(direct, [d for docs in parts for d in docs])
    for ext in (".bin", ".idx"):
        assert open(out + ext, "rb").read() == open(direct + ext, "rb").read()
    assert len(mcore.IndexedDataset(out)) == 60
    # dtype disagreement is refused and leaves nothing behind
    u16 = str(tmp_path / "u16")
    with IndexedDatasetWriter(u16, dtype=np.uint16) as w:
        w.add_document([1, 2])
    with pytest.raises(IndexedDatasetError, match="dtype"):
        merge_indexed([prefixes[0], u16], str(tmp_path / "bad"))
    assert not any(n.startswith("bad") for n in os.listdir(tmp_path))
    # a truncated input is refused
    with open(prefixes[0] + ".bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(IndexedDatasetError, match="p0.bin"):
        merge_indexed(prefixes, str(tmp_path / "bad2"))


def test_merge_cli(tmp_path, capsys):
    from megatron_phi4.data.merge import main

    for i in range(3):
        _write(str(tmp_path / f"s{i}_text_document"), _docs(5, seed=10 + i))
    out = str(tmp_path / "all")
    main(["--input-dir", str(tmp_path), "--pattern", "s*_text_document", "--output-prefix", out])
    ds = IndexedDataset(out)
    assert len(ds) == 15
    assert ds[5].tolist() == IndexedDataset(str(tmp_path / "s1_text_document"))[0].tolist()
    out2 = str(tmp_path / "all2")
    main(["--input", str(tmp_path / "s*_text_document.idx"), "--output-prefix", out2])
    assert open(out + ".bin", "rb").read() == open(out2 + ".bin", "rb").read()
    with IndexedDatasetWriter(str(tmp_path / "m8"), dtype=np.uint8) as w:
        w.add_document([1])
    with pytest.raises(SystemExit):
        main(["--input", out, str(tmp_path / "m8"), "--output-prefix", str(tmp_path / "x")])
    assert "dtype" in capsys.readouterr().err


def test_read_index_info(tmp_path):
    prefix = str(tmp_path / "r")
    docs = _docs(7, seed=9)
    _write(prefix, docs)
    info = read_index(prefix + ".idx")
    assert info.sequence_count == 7 and info.document_count == 8
    assert info.data_nbytes == os.path.getsize(prefix + ".bin")


def test_pickle_reopens_by_path(tmp_path):
    import pickle

    prefix = str(tmp_path / "p")
    docs = _docs(20, seed=11)
    _write(prefix, docs)
    ds = IndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # no data copied
    ds2 = pickle.loads(blob)
    assert [ds2[i].tolist() for i in range(len(ds2))] == [d.tolist() for d in docs]
