"""tools/preprocess_data.py: correctness, bad input, strict, chunks, workers, shards, resume."""
import gzip
import json
import os

import numpy as np
import pytest

from megatron_phi4.data import _preprocess_core as core
from megatron_phi4.data.indexed import IndexedDataset
from megatron_phi4.data.preprocess import main, preprocess
from megatron_phi4.tokenizer import Phi4Tokenizer

EOD = 100257


@pytest.fixture(scope="module")
def tok():
    return Phi4Tokenizer()


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "γάμμα", "日本", "🙂", "<|endoftext|>", "x=1;", "\n", "  ",
             "Zürich"]
    return [f"doc{seed}-{i} " + " ".join(rng.choice(words, int(rng.integers(1, 60))))
            for i in range(n)]


def _write_jsonl(path, texts, key="text", gz=False):
    op = gzip.open if gz else open
    with op(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": 1}) + "\n")


def _read(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _expected(tok, texts, eod=True):
    return [tok.encode(t) + ([EOD] if eod else []) for t in texts]


def _files(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_basic_megatron_readable(tmp_path, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MI

    texts = _texts(50)
    _write_jsonl(tmp_path / "a.jsonl", texts)
    r = preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), append_eod=True,
                   tokenizer=tok, quiet=True)
    prefix = str(tmp_path / "out_text_document")
    assert r.output_prefixes == [prefix] and r.documents == 50
    assert _read(prefix) == _expected(tok, texts)
    mi = MI(prefix)
    assert [mi[i].tolist() for i in range(len(mi))] == _expected(tok, texts)
    # special-token strings in the data are text; only the appended EOD is the real token
    assert all(ids.count(EOD) == 1 for ids in _read(prefix))
    assert r.tokens[0] == sum(map(len, _expected(tok, texts)))
    assert not os.path.exists(str(tmp_path / "out.parts"))  # work dir removed after success


def test_multiple_keys_no_eod(tmp_path, tok):
    with open(tmp_path / "k.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"body {i}", "title": f"title {i}"}) + "\n")
        f.write(json.dumps({"text": "no title"}) + "\n")
    r = preprocess([str(tmp_path / "k.jsonl")], str(tmp_path / "o"), json_keys=["text", "title"],
                   tokenizer=tok, quiet=True)
    assert r.skipped == {"missing_key": 1}
    assert _read(str(tmp_path / "o_text_document")) == [tok.encode(f"body {i}") for i in range(10)]
    assert _read(str(tmp_path / "o_title_document")) == [tok.encode(f"title {i}")
                                                        for i in range(10)]


def _bad_file(path, good):
    """Good docs interleaved with each kind of bad line; returns {line number: reason}."""
    lines = []
    bad = {}
    kinds = [
        ("bad_json", b"{not json\n"),
        ("missing_key", json.dumps({"other": "x"}).encode() + b"\n"),
        ("not_string", json.dumps({"text": 5}).encode() + b"\n"),
        ("invalid_utf8", b'{"text": "caf\xe9 latin-1"}\n'),
        ("empty_document", json.dumps({"text": ""}).encode() + b"\n"),
        ("empty_document", json.dumps({"text": " \n\t "}).encode() + b"\n"),
        ("not_object", b"[1, 2]\n"),
    ]
    for i, t in enumerate(good):
        lines.append(json.dumps({"text": t}).encode() + b"\n")
        if i % 3 == 1 and kinds:
            reason, raw = kinds.pop(0)
            lines.append(raw)
            bad[len(lines)] = reason
        if i == 4:
            lines.append(b"\n")  # blank lines are ignored, not errors
    with open(path, "wb") as f:
        f.writelines(lines)
    assert not kinds
    return bad


@pytest.mark.parametrize("workers,chunk_mb", [(1, 64.0), (2, 0.0005)])
def test_bad_input_skipped_and_reported(tmp_path, tok, capsys, workers, chunk_mb):
    good = _texts(30, seed=1)
    bad = _bad_file(tmp_path / "bad.jsonl", good)
    r = preprocess([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), append_eod=True,
                   tokenizer=tok, workers=workers, chunk_mb=chunk_mb)
    # every good document, in order, nothing shifted
    assert _read(str(tmp_path / "o_text_document")) == _expected(tok, good)
    assert r.skipped == {"bad_json": 1, "missing_key": 1, "not_string": 1, "invalid_utf8": 1,
                         "empty_document": 2, "not_object": 1}
    assert r.blank_lines == 1
    path = str(tmp_path / "bad.jsonl")
    assert {(p, ln, reason) for p, ln, reason, _ in r.bad_lines} == \
        {(path, ln, reason) for ln, reason in bad.items()}
    err = capsys.readouterr().err
    for ln, reason in bad.items():
        assert f"{path}:{ln}: {reason}" in err
    assert "skipped 7 bad lines" in err


def test_strict_fails_without_output(tmp_path, tok, capsys):
    good = _texts(30, seed=2)
    bad = _bad_file(tmp_path / "bad.jsonl", good)
    first = min(bad)
    out = str(tmp_path / "o")
    for workers, chunk in ((1, "64"), (2, "0.0005")):
        with pytest.raises(SystemExit) as ei:
            main(["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", out, "--strict",
                  "--workers", str(workers), "--chunk-mb", chunk, "--quiet"])
        rc = ei.value.code
        assert rc == 1
        err = capsys.readouterr().err
        # the reported line is a real bad line (with 2 workers a later chunk may fail first)
        lines = [ln for ln in bad if f"bad.jsonl:{ln}: {bad[ln]}" in err]
        assert lines, err
        if workers == 1:
            assert lines == [first]
        assert not os.path.exists(out + "_text_document.bin")
        assert not os.path.exists(out + "_text_document.idx")


def test_chunks_workers_gz_glob_identical(tmp_path, tok):
    d = tmp_path / "in"
    d.mkdir()
    all_texts = []
    for i in range(4):
        texts = _texts(40, seed=10 + i)
        _write_jsonl(d / (f"part{i}.jsonl" + (".gz" if i == 2 else "")), texts, gz=(i == 2))
        all_texts += texts
    ref = str(tmp_path / "ref")
    preprocess([str(d / "part*.jsonl*")], ref, append_eod=True, tokenizer=tok, quiet=True)
    assert _read(ref + "_text_document") == _expected(tok, all_texts)
    variants = [
        dict(workers=2, chunk_mb=0.002),           # byte-range chunks, 2 processes
        dict(workers=1, chunk_mb=0.001, batch_kb=1),
        dict(workers=3, chunk_mb=64.0),
    ]
    for j, kw in enumerate(variants):
        out = str(tmp_path / f"v{j}")
        # directory input + explicit duplicates collapse to the same sorted file list
        preprocess([str(d), str(d / "part0.jsonl")], out, append_eod=True, tokenizer=tok,
                   quiet=True, **kw)
        assert _files(out + "_text_document") == _files(ref + "_text_document"), kw


def test_chunk_boundaries_exact(tmp_path, tok):
    # lines of many sizes; chunk sizes that fall inside lines, on newlines, and spanning lines
    texts = ["x" * (i * 37 % 300 + 1) for i in range(60)]
    texts[30] = "long " * 500  # one line spanning several chunks -> empty units after it
    _write_jsonl(tmp_path / "c.jsonl", texts)
    ref = str(tmp_path / "ref")
    preprocess([str(tmp_path / "c.jsonl")], ref, tokenizer=tok, quiet=True)
    for chunk in (1e-4, 3e-4, 1e-3):  # ~105, 315, 1049 bytes
        out = str(tmp_path / f"c{chunk}")
        r = preprocess([str(tmp_path / "c.jsonl")], out, tokenizer=tok, quiet=True,
                       chunk_mb=chunk)
        assert r.units > 1
        assert _files(out + "_text_document") == _files(ref + "_text_document")


def test_sharding_disjoint_and_merge_equals_single_run(tmp_path, tok, monkeypatch):
    from megatron_phi4.data.merge import main as merge_main

    d = tmp_path / "in"
    d.mkdir()
    for i in range(7):
        _write_jsonl(d / f"f{i}.jsonl", _texts(5, seed=100 + i))
    files = core.expand_inputs([str(d / "*.jsonl")])
    n = 3
    shards = [core.shard_files(files, i, n) for i in range(n)]
    assert sorted(sum(shards, [])) == files
    assert sum(len(s) for s in shards) == len(files) and all(shards)
    for i in range(n):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(n))
        with pytest.raises(SystemExit) as ei:
            main(["--input", str(d / "*.jsonl"), "--output-prefix", str(tmp_path / "sh"),
                  "--append-eod", "--quiet"])
        assert ei.value.code == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    outs = [str(tmp_path / f"sh_shard{i:05d}-of-{n:05d}_text_document") for i in range(n)]
    docs = [_read(o) for o in outs]
    assert [len(x) for x in docs] == [5 * len(s) for s in shards]
    # explicit flags override and match the environment defaults
    r = preprocess([str(d / "*.jsonl")], str(tmp_path / "x"), append_eod=True, tokenizer=tok,
                   quiet=True, shard_index=1, num_shards=n)
    assert _read(r.output_prefixes[0]) == docs[1]
    single = str(tmp_path / "single")
    preprocess([str(d)], single, append_eod=True, tokenizer=tok, quiet=True)
    merged = str(tmp_path / "merged")
    merge_main(["--input", *outs, "--output-prefix", merged])
    assert _files(merged) == _files(single + "_text_document")


def test_resume_after_crash_byte_identical(tmp_path, tok, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        _write_jsonl(d / f"f{i}.jsonl", _texts(30, seed=200 + i))
    ref = str(tmp_path / "ref")
    preprocess([str(d)], ref, append_eod=True, tokenizer=tok, quiet=True, chunk_mb=0.002)
    out = str(tmp_path / "out")
    monkeypatch.setenv(core.FAULT_ENV, "crash_after_parts:3")
    with pytest.raises(core.PreprocessError, match="simulated crash"):
        preprocess([str(d)], out, append_eod=True, tokenizer=tok, quiet=True, chunk_mb=0.002)
    assert not os.path.exists(out + "_text_document.bin")
    markers = [f for f in os.listdir(out + ".parts") if f.endswith(".done.json")]
    assert len(markers) == 3
    monkeypatch.delenv(core.FAULT_ENV)
    r = preprocess([str(d)], out, append_eod=True, tokenizer=tok, quiet=True, chunk_mb=0.002,
                   workers=2)
    assert r.units_reused == 3 and r.units > 3
    assert _files(out + "_text_document") == _files(ref + "_text_document")
    assert not os.path.exists(out + ".parts")


def test_resume_after_worker_killed(tmp_path, tok, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        _write_jsonl(d / f"f{i}.jsonl", _texts(60, seed=300 + i))
    ref = str(tmp_path / "ref")
    preprocess([str(d)], ref, append_eod=True, tokenizer=tok, quiet=True)
    out = str(tmp_path / "out")
    monkeypatch.setenv(core.FAULT_ENV, "kill_worker:2")  # SIGKILL mid-unit 2 after a batch
    with pytest.raises(core.PreprocessError, match="worker process died"):
        preprocess([str(d)], out, append_eod=True, tokenizer=tok, quiet=True, workers=2,
                   batch_kb=1)
    assert not os.path.exists(out + "_text_document.bin")
    monkeypatch.delenv(core.FAULT_ENV)
    r = preprocess([str(d)], out, append_eod=True, tokenizer=tok, quiet=True, workers=2)
    assert r.units_reused < r.units
    assert _files(out + "_text_document") == _files(ref + "_text_document")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_resume_missing_part_and_output(tmp_path, tok):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        _write_jsonl(d / f"f{i}.jsonl", _texts(20, seed=400 + i))
    out = str(tmp_path / "out")
    preprocess([str(d)], out, append_eod=True, tokenizer=tok, quiet=True, keep_parts=True)
    ref = _files(out + "_text_document")
    parts = out + ".parts"
    # simulate: final output lost, one part's data lost, one part's marker lost, one part
    # truncated (marker present), and leftover temp files from a killed writer
    os.remove(out + "_text_document.bin")
    bins = sorted(f for f in os.listdir(parts) if f.endswith(".bin"))
    os.remove(os.path.join(parts, bins[0]))
    markers = sorted(f for f in os.listdir(parts) if f.endswith(".done.json"))
    os.remove(os.path.join(parts, markers[1]))
    with open(os.path.join(parts, bins[2]), "r+b") as f:
        f.truncate(12)
    open(os.path.join(parts, "junk.bin.tmp-1-abc"), "wb").write(b"xx")
    r = preprocess([str(d)], out, append_eod=True, tokenizer=tok, quiet=True)
    assert r.units_reused == 0 or r.units_reused < 3
    assert _files(out + "_text_document") == ref
    # changing an option that changes tokens never reuses old parts
    preprocess([str(d)], out, append_eod=True, tokenizer=tok, quiet=True, keep_parts=True)
    r2 = preprocess([str(d)], out, append_eod=False, tokenizer=tok, quiet=True)
    assert r2.units_reused == 0
    assert _read(out + "_text_document")[0] == _expected(tok, _texts(20, seed=400), eod=False)[0]


def test_progress_and_summary_lines(tmp_path, tok, capsys):
    _write_jsonl(tmp_path / "p.jsonl", _texts(40, seed=5))
    preprocess([str(tmp_path / "p.jsonl")], str(tmp_path / "o"), tokenizer=tok,
               log_interval=10, batch_kb=1)
    err = capsys.readouterr().err
    prog = [ln for ln in err.splitlines() if "tok/s" in ln and "ETA" in ln]
    assert prog, err
    assert "docs" in prog[0] and "MB" in prog[0]
    assert "40 documents" in err and "skipped 0 bad lines" in err


def test_input_errors(tmp_path, tok):
    with pytest.raises(core.PreprocessError, match="not found"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), tokenizer=tok,
                   quiet=True)
    with pytest.raises(core.PreprocessError, match="matched no files"):
        preprocess([str(tmp_path / "*.jsonl")], str(tmp_path / "o"), tokenizer=tok, quiet=True)
    with pytest.raises(core.PreprocessError, match="shard"):
        core.shard_files(["a"], 3, 2)


def test_truncated_gz_fails_clearly(tmp_path, tok):
    _write_jsonl(tmp_path / "g.jsonl.gz", _texts(300, seed=7), gz=True)
    raw = open(tmp_path / "g.jsonl.gz", "rb").read()
    open(tmp_path / "t.jsonl.gz", "wb").write(raw[: len(raw) // 2])
    with pytest.raises(core.PreprocessError, match=r"t\.jsonl\.gz.*(corrupt|truncated)"):
        preprocess([str(tmp_path / "t.jsonl.gz")], str(tmp_path / "o"), tokenizer=tok, quiet=True)
    assert not os.path.exists(str(tmp_path / "o_text_document.bin"))


@pytest.mark.parametrize("workers,chunk_mb", [(1, "64"), (2, "0.01")])
def test_every_line_skipped_fails_and_publishes_nothing(tmp_path, tok, capsys, workers, chunk_mb):
    """A wrong --json-keys skips every line: exit non-zero with the counts, the key asked for and
    the keys the lines had; no dataset (megatron-core cannot open an empty one), no parts left."""
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, t in enumerate(_texts(1000, seed=9)):
            f.write(json.dumps({"content": t, "meta": i}) + "\n")
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit) as ei:
        main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", out, "--json-keys", "text",
              "--workers", str(workers), "--chunk-mb", chunk_mb, "--quiet"])
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert "all 1,000 non-blank lines of the 1 input file were skipped (missing_key=1,000)" in err
    assert "0 of 1,000 lines had the key 'text'; --json-keys text; keys seen: ['content', 'meta']" \
        in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no .bin/.idx, no .parts


def test_no_usable_line_is_an_error_for_the_library_too(tmp_path, tok):
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(core.PreprocessError, match="hold no non-blank lines"):
        preprocess([str(tmp_path / "blank.jsonl")], str(tmp_path / "o"), tokenizer=tok, quiet=True)
    (tmp_path / "empty_docs.jsonl").write_text('{"text": ""}\n{"text": " "}\n')
    with pytest.raises(core.PreprocessError, match=r"skipped \(empty_document=2\)"):
        preprocess([str(tmp_path / "empty_docs.jsonl")], str(tmp_path / "o"), tokenizer=tok,
                   quiet=True)
    assert not os.path.exists(str(tmp_path / "o_text_document.idx"))
    # one good line is enough: the run succeeds and reports the rest as skipped
    (tmp_path / "one.jsonl").write_text('{"text": ""}\n{"text": "hello"}\n')
    r = preprocess([str(tmp_path / "one.jsonl")], str(tmp_path / "o"), tokenizer=tok, quiet=True)
    assert r.documents == 1 and r.skipped == {"empty_document": 1}
