"""check_stage_data: every input a stage's data section names is checked, cheaply, before anything
starts; each problem names the config field and the file."""
import json
import os
import types

import numpy as np
import pytest
import yaml

from megatron_phi4.config import DataConfig, LossConfig, StageConfig
from megatron_phi4.data.indexed import IndexedDatasetWriter
from megatron_phi4.data.preference import write_preference_binary
from megatron_phi4.data.preflight import DataInputError, check_recipe_data, check_stage_data

from .conftest import make_docs, write_docs

PAIR = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}


@pytest.fixture
def inputs(tmp_path):
    """A complete set of good inputs: two pre-training prefixes and their mixtures, an SFT pair, a
    preference JSONL and a preference binary."""
    a = write_docs(tmp_path / "a", make_docs(50, seed=1))
    b = write_docs(tmp_path / "b", make_docs(50, seed=2))
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [{"name": "web", "weight": 1, "paths": ["a"]},
                                               {"name": "code", "weight": 2, "paths": ["b"]}]}))
    val = tmp_path / "val.yaml"
    val.write_text(yaml.safe_dump({"sources": [{"name": "web", "weight": 1, "paths": [a]}]}))
    for suffix, dt in (("_tokens", np.int32), ("_loss_mask", np.uint8)):
        with IndexedDatasetWriter(str(tmp_path / f"sft{suffix}"), dtype=dt) as w:
            for n in (3, 5, 2):
                w.add_document(np.ones(n, dt))
    (tmp_path / "pairs.jsonl").write_text("\n" + json.dumps(PAIR) + "\n")
    write_preference_binary([PAIR, PAIR], str(tmp_path / "pbin"))
    return types.SimpleNamespace(root=tmp_path, a=a, b=b, mix=str(mix), val=str(val),
                                 sft=str(tmp_path / "sft"), jsonl=str(tmp_path / "pairs.jsonl"),
                                 pbin=str(tmp_path / "pbin"))


def _stage(name, kind, **data):
    loss = "dpo" if kind == "preference" else "lm"
    return StageConfig(name=name, data=DataConfig(kind=kind, seq_length=8, **data),
                       loss=LossConfig(type=loss), train_steps=1)


def _good_stages(x):
    return [_stage("pretrain", "pretrain", mixture=x.mix, validation=x.val),
            _stage("sft", "sft", paths=[x.sft], validation=x.sft),
            _stage("dpo", "preference", paths=[x.jsonl, x.pbin], validation=f"{x.jsonl},{x.pbin}"),
            _stage("smoke", "synthetic", validation="held-out")]


def test_good_inputs_have_no_problems_and_nothing_is_built(inputs, monkeypatch):
    import megatron_phi4.data.gpt_dataset as gpt
    import megatron_phi4.data.indexed as indexed

    def forbidden(*a, **k):
        raise AssertionError("preflight must not build indices or scan whole index files")

    monkeypatch.setattr(gpt, "build_gpt_indices", forbidden)
    monkeypatch.setattr(indexed, "_validate_index", forbidden)
    monkeypatch.setattr(indexed.IndexedDataset, "__init__", forbidden)
    recipe = types.SimpleNamespace(stages=_good_stages(inputs))
    assert check_recipe_data(recipe) == []
    for st in recipe.stages:
        assert check_stage_data(st, f"stages.{st.name}") == []


def _problems(stage):
    return check_stage_data(stage, f"stages.{stage.name}")


def test_missing_and_broken_pretraining_inputs(inputs):
    x = inputs
    p = _problems(_stage("pretrain", "pretrain", mixture=str(x.root / "nope.yaml")))
    assert p == [f"stages.pretrain.data.mixture: mixture spec {x.root / 'nope.yaml'} does not exist"]
    # a prefix of the mixture is missing its .bin; the validation mixture's .idx is corrupt
    os.remove(x.b + ".bin")
    with open(x.a + ".idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    p = _problems(_stage("pretrain", "pretrain", mixture=x.mix, validation=x.val))
    assert p[0] == f"stages.pretrain.data.mixture: {x.mix}: sources[0] (web).paths[0]: {x.a}.idx: " \
                   "bad magic b'NOTANIDX!', expected b'MMIDIDX\\x00\\x00' (not a megatron MMIDIDX index)"
    assert p[1] == f"stages.pretrain.data.mixture: {x.mix}: sources[1] (code).paths[0]: " \
                   f"{x.b}.bin does not exist"
    assert p[2].startswith(f"stages.pretrain.data.validation: {x.val}: sources[0] (web).paths[0]: ")
    assert len(p) == 3
    # an invalid mixture spec is reported with its own file and field
    (x.root / "bad.yaml").write_text(yaml.safe_dump({"sources": [{"name": "w", "weight": 0,
                                                                  "paths": ["a"]}]}))
    p = _problems(_stage("pretrain", "pretrain", mixture=str(x.root / "bad.yaml")))
    assert len(p) == 1 and p[0].startswith("stages.pretrain.data.mixture: ") \
        and "sources[0] (w).weight: must be a positive number, got 0" in p[0]


def test_truncated_bin_and_idx(inputs):
    x = inputs
    with open(x.b + ".bin", "r+b") as f:
        f.truncate(10)
    with open(x.a + ".idx", "ab") as f:
        f.write(b"\0" * 3)
    p = _problems(_stage("pretrain", "pretrain", mixture=x.mix))
    assert "does not match its header" in p[0] and p[0].endswith("trailing bytes")
    assert f"{x.b}.bin is truncated: 10 bytes" in p[1]


def test_sft_paths(inputs):
    x = inputs
    bad = str(x.root / "runs" / "x" / "sft" / "train")
    p = _problems(_stage("sft", "sft", paths=[x.sft, bad], validation=f"{x.sft},{bad}"))
    assert p == [f"stages.sft.data.paths[1]: {bad}_tokens.idx does not exist (an SFT prefix names "
                 "the PREFIX_tokens and PREFIX_loss_mask datasets of preprocess_chat)",
                 f"stages.sft.data.validation[1]: {bad}_tokens.idx does not exist (an SFT prefix "
                 "names the PREFIX_tokens and PREFIX_loss_mask datasets of preprocess_chat)"]
    os.remove(x.sft + "_loss_mask.bin")
    assert _problems(_stage("sft", "sft", paths=[x.sft])) == [
        f"stages.sft.data.paths[0]: {x.sft}_loss_mask.bin does not exist"]
    with IndexedDatasetWriter(x.sft + "_loss_mask", dtype=np.uint8) as w:
        w.add_document(np.ones(3, np.uint8))
    assert _problems(_stage("sft", "sft", paths=[x.sft])) == [
        f"stages.sft.data.paths[0]: {x.sft}_tokens has 3 conversations but {x.sft}_loss_mask has "
        "1; rerun preprocess_chat"]


def test_preference_paths(inputs):
    x = inputs
    (x.root / "bad.jsonl").write_text("\n\n" + json.dumps({**PAIR, "chosen_ids": [100400]}) + "\n")
    (x.root / "empty.jsonl").write_text("\n")
    os.remove(x.pbin + "_sources.json")
    paths = [x.jsonl, str(x.root / "typo.jsonl"), str(x.root / "bad.jsonl"),
             str(x.root / "empty.jsonl"), x.pbin]
    p = _problems(_stage("dpo", "preference", paths=paths))
    f = "stages.dpo.data.paths"
    assert p == [
        f"{f}[1]: {x.root / 'typo.jsonl'} does not exist (neither a JSONL file nor a binary "
        f"prefix with {x.root / 'typo.jsonl'}_prompt.idx)",
        f"{f}[2]: {x.root / 'bad.jsonl'}:3: chosen_ids[0]: token id 100400 outside [0, 100352)",
        f"{f}[3]: {x.root / 'empty.jsonl'} holds no preference pairs",
        f"{f}[4]: {x.pbin}_sources.json does not exist"]


def test_cache_dir_must_be_creatable(inputs):
    x = inputs
    (x.root / "file").write_text("")
    p = check_stage_data(_stage("s", "synthetic", cache_dir=str(x.root / "file" / "cache")), "stages.s")
    assert p == [f"stages.s.data.cache_dir: {x.root / 'file'} is not a directory"]
    assert check_stage_data(_stage("s", "synthetic", cache_dir=str(x.root / "new" / "c")), "s") == []
    assert not os.path.exists(x.root / "new")  # checked, not created


def test_recipe_check_and_error_type(inputs):
    x = inputs
    stages = _good_stages(x)
    stages[1] = _stage("sft", "sft", paths=[str(x.root / "missing")])
    recipe = types.SimpleNamespace(stages=stages)
    problems = check_recipe_data(recipe)
    assert len(problems) == 1 and problems[0].startswith("stages.sft.data.paths[0]: ")
    assert check_recipe_data(recipe, ["pretrain", "dpo"]) == []
    err = DataInputError(problems)
    assert isinstance(err, ValueError) and err.problems == problems and str(err) == problems[0]
    # a DataConfig alone: fields are relative to the given prefix
    assert check_stage_data(stages[1].data, "data")[0].startswith("data.paths[0]: ")
