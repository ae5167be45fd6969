"""The trimmed vocabulary: a bijection onto [0, num_used), clear errors for unmapped ids, atomic JSON,
and indexed datasets rewritten in trimmed ids with the project's writer."""
import json
import os

import numpy as np
import pytest

from megatron_phi4.demo.trimmed_vocab import (
    REQUIRED_SPECIAL_TOKENS, TrimmedVocab, VocabMapError, trim_indexed_dataset,
)
from megatron_phi4.tokenizer import EOD_ID, IM_END_ID, IM_SEP_ID, IM_START_ID, PAD_ID, PHI4_SPECIAL_TOKENS


@pytest.fixture
def vocab():
    return TrimmedVocab.from_token_ids([[15, 16, 17, 9000], [17, 50000]], extra_ids=[3], pad_to_multiple_of=8)


def test_map_is_a_monotone_bijection_with_the_specials(vocab):
    specials = sorted(PHI4_SPECIAL_TOKENS[t] for t in REQUIRED_SPECIAL_TOKENS)
    assert vocab.phi4_ids.tolist() == [3, 15, 16, 17, 9000, 50000] + specials
    assert vocab.num_used == 11 and vocab.vocab_size == 16  # padded to a multiple of 8
    assert vocab.to_trimmed([3, 9000, 50000]) == [0, 4, 5]
    assert vocab.to_phi4(range(vocab.num_used)) == vocab.phi4_ids.tolist()
    ids = [50000, 17, EOD_ID, IM_START_ID, IM_SEP_ID, IM_END_ID, PAD_ID, 3]
    assert vocab.to_phi4(vocab.to_trimmed(ids)) == ids
    assert vocab.to_phi4([vocab.pad_id, vocab.eod_id, vocab.im_start_id, vocab.im_end_id]) == \
        [PAD_ID, EOD_ID, IM_START_ID, IM_END_ID]
    assert vocab.stop_token_ids == [vocab.im_end_id, vocab.eod_id]


def test_unmapped_ids_raise_naming_the_id_and_position(vocab):
    with pytest.raises(VocabMapError, match=r"Phi-4 token id 18 \(position 2\)") as e:
        vocab.to_trimmed([15, 16, 18])
    assert e.value.position == 2
    with pytest.raises(VocabMapError, match=r"Phi-4 token id -1 \(position 0\)"):
        vocab.to_trimmed([-1])
    with pytest.raises(VocabMapError, match=r"Phi-4 token id 100352 \(position 1\)"):
        vocab.to_trimmed([3, 100352])
    with pytest.raises(VocabMapError, match=r"trimmed token id 12 \(position 1\) is a padding row"):
        vocab.to_phi4([0, 12])
    with pytest.raises(VocabMapError, match=r"trimmed token id 16 \(position 0\) is outside \[0, 16\)"):
        vocab.to_phi4([16])
    assert vocab.decode([vocab.to_trimmed([15])[0], 12], errors="replace").endswith("\ufffd")


def test_save_is_atomic_json_and_load_round_trips(vocab, tmp_path):
    path = vocab.save(tmp_path)
    assert path == str(tmp_path / "vocab.json")
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary left behind
    d = json.loads((tmp_path / "vocab.json").read_text())
    assert d["phi4_ids"] == vocab.phi4_ids.tolist() and d["special"]["<|dummy_85|>"] == vocab.pad_id
    assert TrimmedVocab.load(tmp_path) == vocab and TrimmedVocab.load(path) == vocab


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    ('{"format": "other"}', "not a trimmed-vocabulary file"),
    ('{"format": "megatron_phi4.trimmed_vocab", "version": 9}', "version 9"),
    ('{"format": "megatron_phi4.trimmed_vocab", "version": 1, "vocab_size": 8, "phi4_vocab_size": 100352}',
     "'phi4_ids' is missing"),
    ('{"format": "megatron_phi4.trimmed_vocab", "version": 1, "vocab_size": 8, "phi4_vocab_size": 100352,'
     ' "phi4_ids": [5, 4]}', "strictly increasing"),
    ('{"format": "megatron_phi4.trimmed_vocab", "version": 1, "vocab_size": 8, "phi4_vocab_size": 100352,'
     ' "phi4_ids": [4, 5]}', "lacks required special tokens"),
])
def test_bad_vocab_files_name_the_file_and_problem(tmp_path, content, match):
    f = tmp_path / "v.json"
    f.write_text(content)
    with pytest.raises(VocabMapError, match=match) as e:
        TrimmedVocab.load(f)
    assert str(f) in str(e.value)
    with pytest.raises(VocabMapError, match="no trimmed-vocabulary file"):
        TrimmedVocab.load(tmp_path / "missing.json")


def _write_indexed(prefix, docs, dtype=np.int32):
    from megatron_phi4.data.indexed import IndexedDatasetWriter
    with IndexedDatasetWriter(prefix, dtype=dtype) as w:
        for d in docs:
            if isinstance(d, list) and d and isinstance(d[0], list):  # a document of several sequences
                w.add_document(np.concatenate([np.asarray(s) for s in d]), lengths=[len(s) for s in d])
            else:
                w.add_document(np.asarray(d))


def test_trim_indexed_dataset_maps_every_sequence_and_keeps_documents(vocab, tmp_path):
    from megatron_phi4.data.indexed import IndexedDataset

    docs = [[15, 16, EOD_ID], [[17, 9000], [3, EOD_ID]], [50000, PAD_ID, EOD_ID]]
    _write_indexed(str(tmp_path / "src"), docs)
    n = trim_indexed_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), vocab, chunk_tokens=2)
    src, dst = IndexedDataset(str(tmp_path / "src")), IndexedDataset(str(tmp_path / "dst"))
    assert n == 10 and len(dst) == len(src) == 4
    assert np.array_equal(dst.document_indices, src.document_indices)
    for i in range(len(src)):
        assert dst[i].tolist() == vocab.to_trimmed(src[i])
    # a companion (loss mask) is copied unchanged, dtype included
    _write_indexed(str(tmp_path / "mask"), [[0, 1, 1], [[0, 1], [1, 1]], [1, 0, 1]], dtype=np.uint8)
    trim_indexed_dataset(str(tmp_path / "mask"), str(tmp_path / "mask_dst"), vocab, map_ids=False)
    m = IndexedDataset(str(tmp_path / "mask_dst"))
    assert m.dtype == np.uint8 and [m[i].tolist() for i in range(4)] == [[0, 1, 1], [0, 1], [1, 1], [1, 0, 1]]


def test_trim_indexed_dataset_refuses_unmapped_ids_and_publishes_nothing(vocab, tmp_path):
    _write_indexed(str(tmp_path / "src"), [[15, 16], [17, 18, 3]])
    with pytest.raises(VocabMapError, match=r"src: sequence 1: Phi-4 token id 18"):
        trim_indexed_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), vocab)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("dst")]
