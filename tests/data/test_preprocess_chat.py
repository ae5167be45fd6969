"""tools/preprocess_chat.py: tokens + loss mask datasets, validation with file:line, resume."""
import json
import os

import numpy as np
import pytest

from megatron_phi4.data import _preprocess_core as core
from megatron_phi4.data.indexed import IndexedDataset
from megatron_phi4.data.preprocess_chat import main, preprocess_chat
from megatron_phi4.tokenizer import Phi4Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Phi4Tokenizer()


def _conv(i):
    msgs = []
    if i % 2 == 0:
        msgs.append({"role": "system", "content": f"You are bot {i}."})
    for t in range(1 + i % 3):
        msgs.append({"role": "user", "content": f"question {i}.{t} <|im_end|>?"})
        msgs.append({"role": "assistant", "content": f"answer {i}.{t} " + "ok " * (i % 5)})
    return msgs


def _write(path, records):
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")


def _read(prefix):
    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def test_tokens_and_mask(tmp_path, tok):
    convs = [_conv(i) for i in range(25)]
    _write(tmp_path / "c.jsonl", [{"messages": m, "id": i} for i, m in enumerate(convs)])
    r = preprocess_chat([str(tmp_path / "c.jsonl")], str(tmp_path / "sft"), tokenizer=tok,
                        quiet=True)
    assert r.output_prefixes == [str(tmp_path / "sft_tokens"), str(tmp_path / "sft_loss_mask")]
    tds, toks = _read(str(tmp_path / "sft_tokens"))
    mds, masks = _read(str(tmp_path / "sft_loss_mask"))
    assert tds.dtype == np.int32 and mds.dtype == np.uint8
    assert np.array_equal(tds.sequence_lengths, mds.sequence_lengths)
    for m, ids, mask in zip(convs, toks, masks):
        e_ids, e_mask = tok.apply_chat_template_with_mask(m)
        assert ids == e_ids and mask == e_mask
        # mask covers exactly assistant content + its <|im_end|>
        masked = [t for t, k in zip(ids, mask) if k]
        expect = []
        for msg in m:
            if msg["role"] == "assistant":
                expect += tok.encode(msg["content"]) + [tok.im_end_id]
        assert masked == expect
    # megatron-core reads both
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MI
    mi = MI(str(tmp_path / "sft_loss_mask"))  # keep a reference: megatron unmaps in __del__
    assert mi[3].tolist() == masks[3]


BAD = [
    ("bad_json", b'{"messages": [\n'),
    ("missing_key", {"msgs": []}),
    ("bad_messages", {"messages": "hi"}),
    ("empty_document", {"messages": []}),
    ("bad_messages", {"messages": [{"role": "user"}]}),
    ("bad_role", {"messages": [{"role": "tool", "content": "x"},
                               {"role": "assistant", "content": "y"}]}),
    ("bad_role", {"messages": [{"role": "user", "content": "x"},
                               {"role": "system", "content": "late"},
                               {"role": "assistant", "content": "y"}]}),
    ("bad_messages", {"messages": [{"role": "user", "content": ["x"]},
                                   {"role": "assistant", "content": "y"}]}),
    ("no_assistant", {"messages": [{"role": "user", "content": "only a question"}]}),
    ("empty_content", {"messages": [{"role": "user", "content": ""},
                                    {"role": "assistant", "content": "y"}]}),
    ("invalid_utf8", b'{"messages": [{"role": "user", "content": "\xff"}]}\n'),
    ("not_object", b'"just a string"\n'),
]


def _bad_file(path):
    records, bad, good = [], {}, []
    for i, (reason, rec) in enumerate(BAD):
        good.append(_conv(i))
        records.append({"messages": good[-1]})
        records.append(rec)
        bad[len(records)] = reason
    good.append(_conv(99))
    records.append({"messages": good[-1]})
    _write(path, records)
    return bad, good


@pytest.mark.parametrize("workers,chunk_mb", [(1, 64.0), (2, 0.001)])
def test_validation_skips_with_file_line(tmp_path, tok, capsys, workers, chunk_mb):
    bad, good = _bad_file(tmp_path / "bad.jsonl")
    r = preprocess_chat([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), tokenizer=tok,
                        workers=workers, chunk_mb=chunk_mb)
    _, toks = _read(str(tmp_path / "o_tokens"))
    _, masks = _read(str(tmp_path / "o_loss_mask"))
    assert toks == [tok.apply_chat_template(m) for m in good]
    assert len(masks) == len(good)
    path = str(tmp_path / "bad.jsonl")
    assert {(p, ln, reason) for p, ln, reason, _ in r.bad_lines} == \
        {(path, ln, reason) for ln, reason in bad.items()}
    err = capsys.readouterr().err
    for ln, reason in bad.items():
        assert f"{path}:{ln}: {reason}" in err
    assert sum(r.skipped.values()) == len(BAD)


def test_strict(tmp_path, capsys):
    bad, _ = _bad_file(tmp_path / "bad.jsonl")
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit) as ei:
        main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", out, "--strict",
              "--quiet"])
    assert ei.value.code == 1
    first = min(bad)
    assert f"bad.jsonl:{first}: {bad[first]}" in capsys.readouterr().err
    assert not any(n.startswith("o_") for n in os.listdir(tmp_path))


def test_allow_empty_content_and_resume(tmp_path, tok, monkeypatch):
    convs = [_conv(i) for i in range(40)]
    convs[3] = [{"role": "user", "content": ""}, {"role": "assistant", "content": "fine"}]
    for k in range(3):
        _write(tmp_path / f"c{k}.jsonl", [{"messages": m} for m in convs[k::3]])
    ref = str(tmp_path / "ref")
    r = preprocess_chat([str(tmp_path / "c*.jsonl")], ref, tokenizer=tok, quiet=True,
                        allow_empty_content=True)
    assert r.documents == 40
    out = str(tmp_path / "out")
    monkeypatch.setenv(core.FAULT_ENV, "crash_after_parts:2")
    with pytest.raises(core.PreprocessError):
        preprocess_chat([str(tmp_path / "c*.jsonl")], out, tokenizer=tok, quiet=True,
                        allow_empty_content=True)
    monkeypatch.delenv(core.FAULT_ENV)
    r = preprocess_chat([str(tmp_path / "c*.jsonl")], out, tokenizer=tok, quiet=True,
                        allow_empty_content=True, workers=2)
    assert r.units_reused == 2
    for sfx in ("_tokens", "_loss_mask"):
        for ext in (".bin", ".idx"):
            assert open(out + sfx + ext, "rb").read() == open(ref + sfx + ext, "rb").read()


def test_wrong_messages_key_fails_with_the_keys_seen(tmp_path, capsys):
    _write(tmp_path / "c.jsonl", [{"conversation": _conv(i)} for i in range(20)])
    with pytest.raises(SystemExit) as ei:
        main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o"),
              "--quiet"])
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert "0 of 20 lines had the key 'messages'; --messages-key messages; keys seen: " \
           "['conversation']" in err
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]
