"""Held-out accuracy: the Wilson interval against its defining score test, and evaluate_accuracy's
bookkeeping with a scripted generate_fn (no model)."""
import math
from dataclasses import dataclass

import pytest

from megatron_phi4.demo import arithmetic as A
from megatron_phi4.demo.evaluate import Accuracy, evaluate_accuracy, wilson_interval

Z = 1.959963984540054


def _score_test_bounds(x, n, z=Z):
    """The Wilson interval by its definition -- every p whose score statistic
    |x/n - p| / sqrt(p(1-p)/n) is at most z -- found by bisection, not by the closed form."""
    phat = x / n

    def inside(p):
        return abs(phat - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-15

    def edge(lo, hi):  # lo inside, hi outside
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) else (lo, mid)
        return lo

    lower = 0.0 if x == 0 else edge(phat, 0.0)
    upper = 1.0 if x == n else edge(phat, 1.0)
    return lower, upper


@pytest.mark.parametrize("x,n", [(0, 10), (5, 10), (10, 10), (1, 500), (137, 500), (250, 500), (499, 500),
                                 (3, 7)])
def test_wilson_interval_matches_the_score_test(x, n):
    lo, hi = wilson_interval(x, n)
    rlo, rhi = _score_test_bounds(x, n)
    assert lo == pytest.approx(rlo, abs=1e-12) and hi == pytest.approx(rhi, abs=1e-12)


def test_wilson_interval_closed_form_edge_and_errors():
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z * Z / (10 + Z * Z), rel=1e-12))
    with pytest.raises(ValueError, match="total"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(11, 10)
    a = Accuracy.of(137, 500)
    assert a.rate == 0.274 and a.low < 0.274 < a.high and "27.4%" in str(a)


@dataclass
class _Out:
    token_ids: list
    logprobs: list


def _problems(n, vocab):
    from megatron_phi4.tokenizer import get_tokenizer
    tok = get_tokenizer()
    probs = A.sample_problems("test", n, seed=5)
    return [{"id": f"t{i}", "prompt_ids": [i, 1, 2], "reference": str(p.answer),
             "meta": {"phi4_prompt_ids": [i, 7], "problem": p.to_json()}} for i, p in enumerate(probs)], probs, tok


class _Scripted:
    """Answers right when the prompt's first id is even, wrong otherwise (greedy); when sampling,
    right only for multiples of 4. Records every call."""

    def __init__(self, probs, encode):
        self.probs, self.encode, self.calls = probs, encode, []

    def __call__(self, model, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, num_samples=1,
                 stop_token_ids=None, seed=None):
        self.calls.append(dict(n=len(prompts), temperature=temperature, seed=seed, stop=stop_token_ids,
                               first=prompts[0]))
        out = []
        for p in prompts:
            i = p[0]
            ok = i % 2 == 0 if temperature == 0 else i % 4 == 0
            ans = self.probs[i].answer + (0 if ok else 1)
            ids = self.encode(f"work\n\\boxed{{{ans}}}") + list(stop_token_ids[:1])
            out.append([_Out(ids, [0.0] * len(ids))])
        return out


def test_evaluate_accuracy_counts_modes_seeds_and_batches():
    from megatron_phi4.demo.trimmed_vocab import TrimmedVocab

    recs, probs, tok = _problems(520, None)
    texts = [tok.encode(f"work\n\\boxed{{{p.answer + d}}}") for p in probs for d in (0, 1)]
    vocab = TrimmedVocab.from_token_ids(texts + [list(range(600))])
    encode = lambda s: vocab.to_trimmed(tok.encode(s))  # noqa: E731
    gen = _Scripted(probs, encode)
    res = evaluate_accuracy(object(), recs, vocab=vocab, generate_fn=gen, batch_size=100, seed=3, log=None)
    assert (res.greedy.correct, res.greedy.total) == (260, 520)
    assert (res.sampled.correct, res.sampled.total) == (130, 520)
    assert res.greedy.low < 0.5 < res.greedy.high
    greedy = [c for c in gen.calls if c["temperature"] == 0.0]
    sampled = [c for c in gen.calls if c["temperature"] != 0.0]
    assert [c["n"] for c in greedy] == [100] * 5 + [20] and all(c["seed"] is None for c in greedy)
    assert all(c["temperature"] == 0.7 for c in sampled)
    assert len({c["seed"] for c in sampled}) == 6  # one seed per batch, derived from seed=3
    assert all(c["stop"] == vocab.stop_token_ids for c in gen.calls)
    assert res.records[0]["greedy"] == {"correct": True, "text": f"work\n\\boxed{{{probs[0].answer}}}"}
    assert res.records[1]["greedy"]["correct"] is False
    # same seed, same batches: the same seeds reach generate_fn
    gen2 = _Scripted(probs, encode)
    evaluate_accuracy(object(), recs, vocab=vocab, generate_fn=gen2, batch_size=100, seed=3, log=None)
    assert [c["seed"] for c in gen2.calls] == [c["seed"] for c in gen.calls]


def test_evaluate_accuracy_full_vocabulary_prompts_and_checker():
    recs, probs, tok = _problems(500, None)
    seen = []

    def gen(model, prompts, **kw):
        seen.extend(prompts)
        return [[_Out(tok.encode("\\boxed{1}") + [tok.im_end_id], [])] for _ in prompts]

    res = evaluate_accuracy(object(), recs, generate_fn=gen, modes=("greedy",), checker=lambda t, r: t == "\\boxed{1}",
                            log=None)
    assert res.greedy.correct == 500 and res.sampled is None
    assert seen[:2] == [[0, 7], [1, 7]]  # meta.phi4_prompt_ids without a vocab


def test_evaluate_accuracy_refuses_small_or_malformed_sets():
    recs, _, _ = _problems(500, None)
    with pytest.raises(ValueError, match="min_problems=500"):
        evaluate_accuracy(object(), recs[:499], generate_fn=lambda *a, **k: [], log=None)
    bad = [dict(r) for r in recs]
    del bad[7]["reference"]
    with pytest.raises(ValueError, match="problem 7 \\(t7\\)"):
        evaluate_accuracy(object(), bad, generate_fn=lambda *a, **k: [], log=None)
    with pytest.raises(ValueError, match="modes"):
        evaluate_accuracy(object(), recs, generate_fn=lambda *a, **k: [], modes=("beam",), log=None)
