"""The arithmetic task: worked solutions are right, the answer rule is exact, splits are disjoint by
problem, prompts are ChatML with an assistant generation prompt."""
import random
import re

import pytest

from megatron_phi4.demo import arithmetic as A


def _all_ops(n=300, seed=0):
    rng = random.Random(seed)
    return [A.random_problem(rng) for _ in range(n)]


@pytest.mark.parametrize("p", [A.Problem(482, "+", 37), A.Problem(999, "+", 999), A.Problem(1000, "-", 1),
                               A.Problem(305, "-", 305), A.Problem(987, "x", 9), A.Problem(10, "x", 0),
                               A.Problem(50, "+", 50)])
def test_worked_solution_edge_cases(p):
    sol = A.worked_solution(p)
    assert A.extract_answer(sol) == p.answer
    digits = re.search(r"^result: (.*)$", sol, re.M).group(1).split()
    assert int("".join(digits)) == p.answer


def test_worked_solution_columns_are_consistent():
    """Every column line's arithmetic holds, its written digit and carry follow from it, and the
    carries chain from one line to the next."""
    for p in _all_ops():
        sol = A.worked_solution(p)
        lines = sol.split("\n")
        assert lines[0] == f"{p.a} = {A.spell(p.a)}" and lines[1] == f"{p.b} = {A.spell(p.b)}"
        cols = [ln for ln in lines if re.match(r"^[a-z-]+: ", ln) and not ln.startswith("result")]
        carry, written = 0, []
        for i, ln in enumerate(cols):
            name, rest = ln.split(": ", 1)
            assert name == A.COLUMN_NAMES[i]
            m = re.fullmatch(r"(\d) ([-+x]) (\d) ([-+]) (\d) = (-?\d+), write (\d) (carry|borrow) (\d)", rest)
            assert m, ln
            x, op, y, _, c, v, d, _, nc = m.groups()
            x, y, c, v, d, nc = map(int, (x, y, c, v, d, nc))
            assert c == carry
            assert v == (x * y + c if op == "x" else x + y + c if op == "+" else x - y - c)
            assert d == v % 10 and nc == (v // 10 if op != "-" else int(v < 0))
            carry = nc
            written.append(d)
        assert carry == 0
        assert int("".join(map(str, written[::-1]))) == p.answer
        assert lines[-1] == f"\\boxed{{{p.answer}}}"


@pytest.mark.parametrize("text,ref,ok", [
    ("\\boxed{123}", 123, True),
    ("\\boxed{12}", 123, False),          # a prefix is not the answer
    ("\\boxed{1234}", 123, False),        # nor is a longer number containing it
    ("\\boxed{0123}", 123, True),         # compared as integers
    ("\\boxed{12} then \\boxed{123}", 123, True),   # the LAST box decides
    ("\\boxed{123} then \\boxed{12}", 123, False),
    ("the answer is 123", 123, False),    # no box: wrong
    ("\\boxed{123 apples}", 123, False),  # not a whole integer
    ("\\boxed{ 123 }", 123, True),
    ("\\boxed{-5}", -5, True),
    ("\\boxed{}", 0, False),
    ("123", "123", False),
    ("\\boxed{123}", "123", True),
])
def test_answer_rule(text, ref, ok):
    assert A.is_correct(text, ref) is ok


def test_splits_are_disjoint_by_problem_and_deterministic():
    sets = {}
    for split in A.SPLITS:
        a = A.sample_problems(split, 400, seed=1)
        b = A.sample_problems(split, 400, seed=2)
        assert a == A.sample_problems(split, 400, seed=1)  # deterministic from the seed
        assert a != b
        assert len({p.key for p in a}) == 400  # distinct within a draw
        assert all(A.split_of(p) == split for p in a + b)
        sets[split] = {p.key for p in a + b}
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]


def test_split_ignores_operand_order_of_commutative_ops():
    rng = random.Random(3)
    for _ in range(500):
        a, b = rng.randrange(10, 1000), rng.randrange(10, 1000)
        assert A.split_of(A.Problem(a, "+", b)) == A.split_of(A.Problem(b, "+", a))
        assert A.Problem(a, "x", 7).key == A.Problem(7, "x", a).key


def test_split_fractions_roughly_as_documented():
    rng = random.Random(4)
    counts = {s: 0 for s in A.SPLITS}
    for _ in range(20000):
        counts[A.split_of(A.random_problem(rng))] += 1
    assert 0.08 < counts["test"] / 20000 < 0.12
    assert 0.03 < counts["validation"] / 20000 < 0.07


def test_bad_problems_and_specs_are_refused():
    with pytest.raises(ValueError, match="op"):
        A.Problem(1, "/", 2)
    with pytest.raises(ValueError, match="negative"):
        A.Problem(1, "-", 2)
    with pytest.raises(ValueError, match="add_digits"):
        A.TaskSpec(add_digits=(3, 2))
    with pytest.raises(ValueError, match="split"):
        A.sample_problems("dev", 1, seed=0)


def test_chat_prompt_and_sft_target():
    from megatron_phi4.tokenizer import IM_END_ID, IM_SEP_ID, IM_START_ID, get_tokenizer

    tok = get_tokenizer()
    p = A.Problem(482, "+", 37)
    prompt = tok.apply_chat_template(A.prompt_messages(p), add_generation_prompt=True)
    assert tok.render_chat(A.prompt_messages(p), add_generation_prompt=True) == tok.decode(prompt)
    assert prompt[:1] == [IM_START_ID] and prompt[-1] == IM_SEP_ID
    assert tok.decode(prompt).endswith("<|im_start|>assistant<|im_sep|>")
    assert "What is 482 + 37?" in tok.decode(prompt) and A.SYSTEM_PROMPT in tok.decode(prompt)
    ids, mask = tok.apply_chat_template_with_mask(A.messages(p))
    assert ids[:len(prompt)] == prompt  # the SFT conversation continues the evaluation prompt
    target = [t for t, m in zip(ids, mask) if m]
    assert target[-1] == IM_END_ID and tok.decode(target[:-1]) == A.worked_solution(p)


def test_pretraining_corpus_holds_solutions_and_facts():
    probs = A.sample_problems("train", 20, seed=0)
    docs = A.pretrain_documents(probs, seed=0, fact_repeats=1)
    assert docs == A.pretrain_documents(probs, seed=0, fact_repeats=1)
    sols = [d for d in docs if d.startswith("Question: ")]
    assert sorted(sols) == sorted(f"Question: {p.question}\nSolution:\n{A.worked_solution(p)}" for p in probs)
    facts = "\n".join(d for d in docs if not d.startswith("Question: "))
    assert "7 + 8 + 1 = 16, write 6 carry 1" in facts and "482 = 4 8 2" in facts and "4 8 2 = 482" in facts
