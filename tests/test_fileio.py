"""megatron_phi4.fileio: the one atomic small-file writer (checkpoints' ``latest``, post-training
reports, demo state). Readers must see the old file or the whole new one, never a torn or empty one,
and a failed write must leave no temporary file behind."""
import json
import os

import pytest

from megatron_phi4 import fileio
from megatron_phi4.checkpoint import format as ckpt_format
from megatron_phi4.posttrain import records


def test_json_round_trip_creates_parents_and_leaves_one_file(tmp_path):
    p = tmp_path / "a" / "b" / "report.json"
    fileio.atomic_write_json(p, {"z": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"z": 1, "a": [1, 2]} and p.read_text().endswith("}\n")
    fileio.atomic_write_json(p, {"z": 2, "a": 0}, sort_keys=True, indent=None)
    assert p.read_text() == '{"a": 0, "z": 2}\n'
    assert os.listdir(p.parent) == ["report.json"]


def test_unserialisable_object_keeps_the_old_file(tmp_path):
    p = tmp_path / "state.json"
    fileio.atomic_write_json(p, {"step": 1})
    with pytest.raises(TypeError):
        fileio.atomic_write_json(p, {"step": object()})
    assert json.loads(p.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["state.json"]


def test_failed_write_removes_its_temporary_file_and_keeps_the_old(tmp_path, monkeypatch):
    p = tmp_path / "latest"
    fileio.atomic_write_text(p, "old\n")

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write_text(p, "new\n")
    assert p.read_text() == "old\n" and os.listdir(tmp_path) == ["latest"]


def test_every_package_writes_through_fileio():
    # one implementation: the checkpoint format re-exports it, post-training's JSON writer uses it
    assert ckpt_format.atomic_write_text is fileio.atomic_write_text
    assert ckpt_format.TMP_INFIX == fileio.TMP_INFIX


def test_posttrain_writer_is_the_atomic_json_writer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(records, "atomic_write_json", lambda path, obj: calls.append((path, obj)))
    records.write_json_atomic(str(tmp_path / "x.json"), {"k": 1})
    assert calls == [(str(tmp_path / "x.json"), {"k": 1})]
