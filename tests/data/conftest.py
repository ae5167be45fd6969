"""Fixtures that write small indexed datasets (megatron .bin/.idx) for the data tests."""
import numpy as np
import pytest

from megatron_phi4.data.indexed import IndexedDatasetWriter

EOD = 100257


def write_docs(prefix, docs, dtype=np.int32):
    with IndexedDatasetWriter(str(prefix), dtype=dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=dtype))
    return str(prefix)


def make_docs(n, seed=0, lo=1, hi=60, tag=0):
    """``n`` documents; document ``i`` is ``[tag*1e6 + i*1000 + 1, ...]`` ending with EOD, so every
    token tells where it came from (tokens < 100257 by construction for small n)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi, size=n)
    docs = []
    for i, L in enumerate(lens):
        body = tag * 10_000 + (i % 10) * 1000 + np.arange(1, L) % 1000 + 1
        docs.append(np.concatenate([body, [EOD]]).astype(np.int64))
    return docs


@pytest.fixture
def docs_dataset(tmp_path):
    """Factory: ``docs_dataset(name, docs)`` -> prefix."""
    def make(name, docs):
        return write_docs(tmp_path / name, docs)
    return make
