"""The arithmetic data directory: built with the project's writers in trimmed ids, reusable, refused
when built with other parameters; problem files for PTS / evaluation; stage data that pads and splits
documents with the trimmed ids (``data.pad_id`` / ``data.eod_id``)."""
import json
import os

import numpy as np
import pytest

from megatron_phi4.demo import arithmetic as A
from megatron_phi4.demo.arithmetic_data import DataSizes, read_problems, write_arithmetic_data

SMALL = DataSizes(sft_train=120, sft_valid=10, pretrain_solutions=60, pretrain_valid=10, fact_repeats=1, test=30,
                  validation=20, train_pool=20)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_arithmetic_data(str(tmp_path_factory.mktemp("arith") / "data"), seed=7, sizes=SMALL, log=lambda s: None)


def test_layout_manifest_and_reuse(data, tmp_path):
    root = os.path.dirname(data.root)
    assert sorted(p for p in os.listdir(root) if p.startswith("data")) == ["data", "data.lock"]  # no temp dir
    m = json.loads(open(data.manifest).read())
    assert m["counts"] == {"sft_train": 120, "sft_valid": 10, "pretrain_solutions": 60, "pretrain_valid": 10,
                           "test": 30, "validation": 20, "train_pool": 20}
    assert m["vocab_size"] % 64 == 0 and m["vocab_used"] <= m["vocab_size"]
    before = os.path.getmtime(data.manifest)
    again = write_arithmetic_data(data.root, seed=7, sizes=SMALL, log=lambda s: None)
    assert again == data and os.path.getmtime(data.manifest) == before  # reused, not rebuilt
    with pytest.raises(ValueError, match="other parameters"):
        write_arithmetic_data(data.root, seed=8, sizes=SMALL, log=lambda s: None)


def test_datasets_are_the_phi4_ones_in_trimmed_ids(data):
    from megatron_phi4.data.indexed import IndexedDataset
    vocab = data.vocab()
    for phi4_prefix, trimmed_prefix in ((data.phi4["sft_train"] + "_tokens", data.sft_train + "_tokens"),
                                        (data.phi4["pretrain_train"], os.path.join(data.root, "bin", "pretrain_train"))):
        a, b = IndexedDataset(phi4_prefix), IndexedDataset(trimmed_prefix)
        assert len(a) == len(b) > 0
        assert np.array_equal(a.document_indices, b.document_indices)
        for i in range(len(a)):
            assert vocab.to_phi4(b[i]) == a[i].tolist()
    m1, m2 = IndexedDataset(data.phi4["sft_train"] + "_loss_mask"), IndexedDataset(data.sft_train + "_loss_mask")
    assert all(np.array_equal(m1[i], m2[i]) for i in range(len(m1)))


def test_sft_masks_are_assistant_only(data):
    from megatron_phi4.data.indexed import IndexedDataset
    from megatron_phi4.tokenizer import get_tokenizer
    vocab, tok = data.vocab(), get_tokenizer()
    toks, masks = IndexedDataset(data.sft_train + "_tokens"), IndexedDataset(data.sft_train + "_loss_mask")
    for i in range(5):
        ids, mask = vocab.to_phi4(toks[i]), masks[i].tolist()
        target = tok.decode([t for t, k in zip(ids, mask) if k])
        prompt = tok.decode([t for t, k in zip(ids, mask) if not k])
        assert target.endswith("}<|im_end|>") and "\\boxed{" in target and "What is" not in target
        assert A.SYSTEM_PROMPT in prompt and prompt.endswith("<|im_start|>assistant<|im_sep|>")


def test_problem_files(data):
    from megatron_phi4.tokenizer import get_tokenizer
    vocab, tok = data.vocab(), get_tokenizer()
    for path, split, n in ((data.test_problems, "test", 30), (data.validation_problems, "validation", 20),
                           (data.train_pool_problems, "train", 20)):
        recs = read_problems(path)
        assert len(recs) == n and len({r["id"] for r in recs}) == n
        for r in recs:
            assert set(r) == {"id", "prompt_ids", "reference", "meta"}  # PTS's question format
            p = A.Problem(**r["meta"]["problem"])
            assert p.split == split == r["meta"]["split"] and r["reference"] == str(p.answer)
            assert tok.decode(vocab.to_phi4(r["prompt_ids"])) == tok.render_chat(A.prompt_messages(p), True)
            assert r["meta"]["phi4_prompt_ids"] == vocab.to_phi4(r["prompt_ids"])
    keys = lambda path: {A.Problem(**r["meta"]["problem"]).key for r in read_problems(path)}  # noqa: E731
    assert not keys(data.test_problems) & keys(data.train_pool_problems)


def test_read_problems_names_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt_ids": [1], "reference": "2"}\n\n{"id": "b", "prompt_ids": [1]}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: field 'reference' is missing"):
        read_problems(str(f))
    f.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: not valid JSON"):
        read_problems(str(f))


def test_stage_data_uses_the_trimmed_pad_and_eod(data, tmp_path):
    """The recipe's data sections carry the trimmed pad/eod ids; the stage data built from them stays
    inside the trimmed vocabulary and pads with the trimmed pad id."""
    from megatron_phi4.config import RecipeConfig, from_dict
    from megatron_phi4.data.stage import build_stage_data
    from megatron_phi4.demo.arithmetic_run import arithmetic_recipe
    vocab = data.vocab()
    tree = arithmetic_recipe(data, vocab, str(tmp_path / "run"), pretrain_steps=2, sft_steps=2)
    recipe = from_dict(RecipeConfig, tree).validate(1)
    for stage in recipe.stages:
        assert (stage.data.pad_id, stage.data.eod_id) == (vocab.pad_id, vocab.eod_id)
        sd = build_stage_data(stage, 0, 1, 0, 2, vocab_size=vocab.vocab_size, cache_dir=str(tmp_path / "cache"))
        for mb in sd.next_global_batch():
            assert int(mb["input_ids"].max()) < vocab.num_used and int(mb["labels"].max()) < vocab.num_used
            if stage.data.kind == "sft":
                pad = mb["labels"] == vocab.pad_id
                assert pad.any() and (mb["loss_mask"][pad] == 0).all()
            else:  # documents restart their positions after every trimmed end-of-document
                eod = mb["input_ids"] == vocab.eod_id
                assert eod.any()
                b, s = eod.nonzero()[0].tolist()
                if s + 1 < mb["input_ids"].shape[1]:
                    assert int(mb["position_ids"][b, s + 1]) == 0


def test_recipe_refuses_special_ids_outside_the_vocabulary(data, tmp_path):
    from megatron_phi4.config import ConfigError, RecipeConfig, from_dict
    from megatron_phi4.demo.arithmetic_run import arithmetic_recipe
    tree = arithmetic_recipe(data, data.vocab(), str(tmp_path / "run"))
    tree["stages"][1]["data"]["pad_id"] = 100349
    with pytest.raises(ConfigError, match=r"stages.sft.data.pad_id.*outside the model's vocabulary"):
        from_dict(RecipeConfig, tree).validate(1)
