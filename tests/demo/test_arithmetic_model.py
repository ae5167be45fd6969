"""The trained arithmetic model (session fixture ``arithmetic_model``, trained once): its data and
checkpoints, held-out accuracy with intervals, and the export back to Phi-4 ids.

Decoding uses tests/demo/simple_generate.py (a deliberately simple loop following the contract of
``megatron_phi4.generation.generate``), not the library's sampler."""
import json

import pytest
import torch

from megatron_phi4.demo import arithmetic as A
from megatron_phi4.demo.arithmetic_data import read_problems
from megatron_phi4.demo.evaluate import evaluate_accuracy
from megatron_phi4.demo.trimmed_vocab import TrimmedVocab, VocabMapError
from megatron_phi4.demo.vocab_export import expand_checkpoint, restrict_to_vocab
from tests.arithmetic_model import load
from tests.demo.simple_generate import simple_generate


def test_run_layout_and_trimmed_vocabulary(arithmetic_model):
    m = arithmetic_model
    vocab = m.vocab
    assert TrimmedVocab.load(m.vocab_path) == vocab == TrimmedVocab.load(m.data.vocab_path)
    model = load(m.sft_checkpoint)
    assert model.config.vocab_size == vocab.vocab_size < 2048
    for name in ("test_problems", "validation_problems", "train_pool_problems"):
        recs = read_problems(getattr(m.data, name))
        assert len(recs) >= 500
        for r in recs[:50]:
            assert vocab.to_trimmed(r["meta"]["phi4_prompt_ids"]) == r["prompt_ids"]
    manifest = json.loads(open(m.data.manifest).read())
    assert manifest["pad_id"] == vocab.pad_id and manifest["vocab_size"] == vocab.vocab_size


def test_held_out_problems_never_reach_training(arithmetic_model):
    """No test or validation problem is in the pre-training corpus or the SFT conversations, and the
    PTS / DPO pool is disjoint from both training sets."""
    import os
    root = arithmetic_model.data.root
    raw = {n: open(os.path.join(root, "raw", n)).read() for n in
           ("pretrain_train.jsonl", "sft_train.jsonl")}
    seen = {f"{q}" for text in raw.values() for q in _questions(text)}
    assert seen  # the corpus does hold questions
    for name, split in (("test_problems", "test"), ("validation_problems", "validation"),
                        ("train_pool_problems", "train")):
        for r in read_problems(getattr(arithmetic_model.data, name)):
            assert r["meta"]["split"] == split
            assert A.Problem(**r["meta"]["problem"]).split == split
            assert r["meta"]["question"] not in seen


def _questions(text):
    import re
    return re.findall(r"What is \d+ [-+x] \d+\?", text)


def test_sft_model_held_out_accuracy_greedy_and_sampled(arithmetic_model, record_property):
    """500 held-out problems, greedy and sampled at T=0.7 (seeded), with 95% Wilson intervals. The
    shared base must be neither hopeless nor perfect (PTS needs both outcomes, DPO needs room)."""
    m = arithmetic_model
    model = load(m.sft_checkpoint)
    probs = read_problems(m.data.test_problems)[:500]
    res = evaluate_accuracy(model, probs, vocab=m.vocab, generate_fn=simple_generate, temperature=0.7, seed=0,
                            log=None)
    record_property("greedy", str(res.greedy))
    record_property("sampled", str(res.sampled))
    print(f"\nSFT held-out accuracy: greedy {res.greedy}; sampled T=0.7 {res.sampled}; {res.wall_s:.0f}s")
    assert res.greedy.total == res.sampled.total == 500
    assert 0.05 < res.greedy.rate < 0.95, res.greedy
    assert 0.0 < res.sampled.rate < 0.95, res.sampled
    # every right answer is right by the rule, recomputed here from the text
    for rec, p in zip(res.records, probs):
        assert rec["greedy"]["correct"] == A.is_correct(rec["greedy"]["text"], p["reference"])


@pytest.fixture(scope="module")
def exported(arithmetic_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sft_phi4_vocab"
    expand_checkpoint(arithmetic_model.sft_checkpoint, out)
    return out


def _prompts(m, n=48):
    recs = read_problems(m.data.test_problems)[:n]
    return [r["prompt_ids"] for r in recs], [r["meta"]["phi4_prompt_ids"] for r in recs]


def test_exported_model_greedy_equals_trimmed_in_phi4_ids(arithmetic_model, exported):
    from megatron_phi4.tokenizer import EOD_ID, IM_END_ID, PHI4_VOCAB_SIZE
    m = arithmetic_model
    vocab = m.vocab
    trimmed, full = load(m.sft_checkpoint), load(exported)
    assert full.config.vocab_size == PHI4_VOCAB_SIZE and TrimmedVocab.load(exported) == vocab
    tp, fp = _prompts(m)
    a = simple_generate(trimmed, tp, max_new_tokens=60, stop_token_ids=vocab.stop_token_ids)
    b = simple_generate(full, fp, max_new_tokens=60, stop_token_ids=[IM_END_ID, EOD_ID])
    for x, y in zip(a, b):
        assert vocab.to_phi4(x[0].token_ids) == y[0].token_ids
    # ... and with the generation-time restriction in place
    handle = restrict_to_vocab(full, vocab)
    c = simple_generate(full, fp, max_new_tokens=60, stop_token_ids=[IM_END_ID, EOD_ID])
    handle.remove()
    assert [z[0].token_ids for z in c] == [y[0].token_ids for y in b]


def _teacher_forced(model, rows):
    with torch.no_grad():
        return model(torch.tensor(rows)).float()


def test_export_logits_unused_rows_and_restriction(arithmetic_model, exported):
    """On mapped ids the exported logits are the trimmed ones; no unused id's logit ever exceeds the
    best mapped one (greedy is safe without a bias); with restrict_to_vocab both models give the same
    next-token distribution (so sampling draws from the same distribution)."""
    m = arithmetic_model
    vocab = m.vocab
    trimmed, full = load(m.sft_checkpoint), load(exported)
    tp, fp = _prompts(m, 8)
    L = min(len(p) for p in tp)
    tp, fp = [p[:L] for p in tp], [p[:L] for p in fp]
    used = torch.as_tensor(vocab.phi4_ids)
    lt, lf = _teacher_forced(trimmed, tp), _teacher_forced(full, fp)
    torch.testing.assert_close(lf[..., used], lt[..., :vocab.num_used], rtol=1e-5, atol=1e-5)
    unused = torch.ones(lf.shape[-1], dtype=torch.bool)
    unused[used] = False
    assert (lf[..., unused].amax(-1) < lf[..., used].amax(-1)).all()
    h1, h2 = restrict_to_vocab(trimmed, vocab), restrict_to_vocab(full, vocab)
    pt = torch.log_softmax(_teacher_forced(trimmed, tp), -1)
    pf = torch.log_softmax(_teacher_forced(full, fp), -1)
    h1.remove(), h2.remove()
    torch.testing.assert_close(pf[..., used], pt[..., :vocab.num_used], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(pf[..., unused]).all() and torch.isneginf(pt[..., vocab.num_used:]).all()


def test_export_refuses_a_mismatched_map(arithmetic_model, tmp_path):
    other = TrimmedVocab(arithmetic_model.vocab.phi4_ids, vocab_size=arithmetic_model.vocab.vocab_size + 64)
    with pytest.raises(VocabMapError, match="model.vocab_size is"):
        expand_checkpoint(arithmetic_model.sft_checkpoint, tmp_path / "x", other)
    assert not (tmp_path / "x").exists()
    with pytest.raises(VocabMapError, match="model has"):
        restrict_to_vocab(load(arithmetic_model.sft_checkpoint), other)
