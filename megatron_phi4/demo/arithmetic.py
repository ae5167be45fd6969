"""A verifiable task for the CPU demo: multi-digit arithmetic with worked, column-wise steps.

Why this task: post-training (Pivotal Token Search, DPO) needs questions whose answers a program
can check, a model that gets some of them right and some wrong, and solutions whose individual
tokens matter (a wrong carry decides the answer). Column arithmetic has all three, and a tiny
Phi-4 learns it on two CPU cores in minutes.

Problems (:class:`Problem`): ``a + b`` and ``a - b`` with ``a, b`` of 2-4 digits (``a >= b``
for subtraction), and ``a x b`` with ``a`` of 2-4 digits and ``b`` one digit (2-9); the mix is
:class:`TaskSpec`. The worked solution (:func:`worked_solution`), the SFT target, spells each
operand into digits (the Phi-4 tokenizer writes numbers in chunks of up to three digits:
``4821`` is ``482|1``), works one column per line from the ones up, lists the result digits and
ends with the answer in a box::

    4821 = 4 8 2 1
    379 = 3 7 9
    ones: 1 + 9 + 0 = 10, write 0 carry 1
    tens: 2 + 7 + 1 = 10, write 0 carry 1
    hundreds: 8 + 3 + 1 = 12, write 2 carry 1
    thousands: 4 + 0 + 1 = 5, write 5 carry 0
    result: 5 2 0 0
    \\boxed{5200}

Answer rule (:func:`extract_answer`, :func:`is_correct`): the answer is the content of the LAST
``\\boxed{...}`` in the completion; it must be a whole integer (``-?[0-9]+``) and is compared with
the reference as an integer -- never as a substring, so ``\\boxed{12}`` does not answer 123 and
``\\boxed{1234}`` does not answer 123. A completion without a box, or with anything else in its
last box, is wrong. This is the numeric oracle's "last boxed" rule.

Splits are disjoint BY PROBLEM: each problem's split is a fixed function of the problem itself
(:func:`split_of`: a hash of its canonical form, in which ``a + b`` and ``b + a`` -- and ``a x b``
and ``b x a`` -- are the same problem), so no seed, sample size or generation order can put one
problem in two splits. 85% of all problems are ``train``, 5% ``validation``, 10% ``test``
(held out from every training and post-training stage). The seed only chooses which problems of a
split are drawn (:func:`sample_problems`).

The pre-training corpus (:func:`pretrain_documents`) is plain text: worked solutions of training
problems and number facts (numbers spelled into digits and back, the one-column addition,
subtraction and multiplication steps) -- what the model must know before SFT teaches it to answer
in the chat format.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Problem", "TaskSpec", "DEFAULT_TASK", "SPLITS", "SYSTEM_PROMPT", "split_of", "sample_problems",
    "worked_solution", "messages", "prompt_messages", "extract_answer", "is_correct",
    "pretrain_documents", "COLUMN_NAMES",
]

SPLITS = ("train", "validation", "test")
# Fractions of the problem universe per split (by hash; see split_of).
_SPLIT_BOUNDS = (("test", 0.10), ("validation", 0.15))  # u < 0.10: test; u < 0.15: validation
_SPLIT_SALT = b"megatron_phi4.demo.arithmetic/v1"
SYSTEM_PROMPT = "Work column by column. End with \\boxed{N}."
COLUMN_NAMES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
OPS = ("+", "-", "x")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class Problem:
    """``a op b`` with ``op`` in ``+ - x``."""
    a: int
    op: str
    b: int

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"Problem.op: got {self.op!r}, allowed: {', '.join(OPS)}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"Problem: operands must be non-negative, got {self.a}, {self.b}")
        if self.op == "-" and self.a < self.b:
            raise ValueError(f"Problem: {self.a} - {self.b} would be negative")

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "x": self.a * self.b}[self.op]

    @property
    def key(self) -> str:
        """Canonical form: commutative operations list the smaller operand first."""
        a, b = (min(self.a, self.b), max(self.a, self.b)) if self.op in "+x" else (self.a, self.b)
        return f"{a}{self.op}{b}"

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def split(self) -> str:
        return split_of(self)

    def to_json(self) -> Dict:
        return {"a": self.a, "op": self.op, "b": self.b}


def split_of(problem: Problem) -> str:
    """The split a problem belongs to: a fixed hash of its canonical form (see module doc)."""
    h = hashlib.blake2b(problem.key.encode(), key=_SPLIT_SALT, digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2.0**64
    for name, bound in _SPLIT_BOUNDS:
        if u < bound:
            return name
    return "train"


@dataclass(frozen=True)
class TaskSpec:
    """The problem mix: operation weights and operand sizes (digits, inclusive ranges)."""
    op_weights: Tuple[Tuple[str, float], ...] = (("+", 0.4), ("-", 0.3), ("x", 0.3))
    add_digits: Tuple[int, int] = (2, 3)
    sub_digits: Tuple[int, int] = (2, 3)
    mul_digits: Tuple[int, int] = (2, 3)      # the multi-digit factor
    mul_factor: Tuple[int, int] = (2, 9)      # the one-digit factor (a value range)

    def __post_init__(self):
        for op, w in self.op_weights:
            if op not in OPS or w < 0:
                raise ValueError(f"TaskSpec.op_weights: bad entry ({op!r}, {w}); ops are {OPS}, "
                                 "weights >= 0")
        for name in ("add_digits", "sub_digits", "mul_digits"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= 5:
                raise ValueError(f"TaskSpec.{name}: got {(lo, hi)}, need 1 <= lo <= hi <= 5")
        lo, hi = self.mul_factor
        if not 0 <= lo <= hi <= 9:
            raise ValueError(f"TaskSpec.mul_factor: got {(lo, hi)}, need 0 <= lo <= hi <= 9")


DEFAULT_TASK = TaskSpec()


def _number(rng: random.Random, digits: Tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)


def random_problem(rng: random.Random, spec: TaskSpec = DEFAULT_TASK) -> Problem:
    ops, weights = zip(*spec.op_weights)
    op = rng.choices(ops, weights)[0]
    if op == "+":
        return Problem(_number(rng, spec.add_digits), "+", _number(rng, spec.add_digits))
    if op == "-":
        x, y = _number(rng, spec.sub_digits), _number(rng, spec.sub_digits)
        return Problem(max(x, y), "-", min(x, y))
    return Problem(_number(rng, spec.mul_digits), "x", rng.randint(*spec.mul_factor))


def sample_problems(split: str, n: int, seed: int, spec: TaskSpec = DEFAULT_TASK,
                    exclude: Sequence[Problem] = ()) -> List[Problem]:
    """``n`` distinct problems (distinct canonical forms) of ``split``, deterministic in ``seed``.

    Problems are drawn from the task mix and kept when they belong to ``split`` (rejection), so
    each split follows the same distribution. ``exclude``: problems not to draw again (e.g. the
    SFT set when drawing the pre-training solutions)."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, allowed: {', '.join(SPLITS)}")
    rng = random.Random(f"{seed}/{split}")
    seen = {p.key for p in exclude}
    out: List[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"sample_problems: could not find {n} distinct {split} problems "
                             f"(found {len(out)}); the task mix is too small for that many")
        p = random_problem(rng, spec)
        if p.key in seen or split_of(p) != split:
            continue
        seen.add(p.key)
        out.append(p)
    return out


# --------------------------------------------------------------------------- worked solutions
def _digits(n: int) -> List[int]:
    return [int(c) for c in str(n)]


def spell(n: int) -> str:
    """``4821`` -> ``4 8 2 1``."""
    return " ".join(str(n))


def _column_lines(p: Problem) -> Tuple[List[str], List[int]]:
    """The per-column lines and the written digits (ones first)."""
    lines, written = [], []
    if p.op == "x":
        da = _digits(p.a)[::-1]
        carry = 0
        i = 0
        while i < len(da) or carry:
            x = da[i] if i < len(da) else 0
            v = x * p.b + carry
            d, carry = v % 10, v // 10
            lines.append(f"{COLUMN_NAMES[i]}: {x} x {p.b} + {v - x * p.b} = {v}, write {d} carry {carry}")
            written.append(d)
            i += 1
        return lines, written
    da, db = _digits(p.a)[::-1], _digits(p.b)[::-1]
    n = max(len(da), len(db))
    c = 0
    i = 0
    while i < n or (p.op == "+" and c):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        if p.op == "+":
            v = x + y + c
            d, nc = v % 10, v // 10
            lines.append(f"{COLUMN_NAMES[i]}: {x} + {y} + {c} = {v}, write {d} carry {nc}")
        else:
            v = x - y - c
            d, nc = (v, 0) if v >= 0 else (v + 10, 1)
            lines.append(f"{COLUMN_NAMES[i]}: {x} - {y} - {c} = {v}, write {d} borrow {nc}")
        written.append(d)
        c = nc
        i += 1
    return lines, written


def worked_solution(p: Problem) -> str:
    """The SFT target: operands spelled, one line per column, result digits, boxed answer."""
    lines = [f"{p.a} = {spell(p.a)}", f"{p.b} = {spell(p.b)}"]
    cols, written = _column_lines(p)
    lines += cols
    lines.append("result: " + " ".join(str(d) for d in written[::-1]))
    lines.append(f"\\boxed{{{p.answer}}}")
    return "\n".join(lines)


def prompt_messages(p: Problem) -> List[Dict[str, str]]:
    """System + user turns (add the generation prompt when tokenizing)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p.question}]


def messages(p: Problem) -> List[Dict[str, str]]:
    """The SFT conversation: system, user, and the worked solution as the assistant turn."""
    return prompt_messages(p) + [{"role": "assistant", "content": worked_solution(p)}]


# --------------------------------------------------------------------------- answer rule
def extract_answer(text: str) -> Optional[int]:
    """The integer in the last ``\\boxed{...}`` of ``text``; None when there is no box or its
    content is not exactly an integer (``-?[0-9]+``)."""
    boxes = _BOXED.findall(text)
    if not boxes:
        return None
    content = boxes[-1].strip()
    if not _INTEGER.fullmatch(content):
        return None
    return int(content)


def is_correct(text: str, reference) -> bool:
    """Whether ``text`` answers ``reference`` (an int, or its decimal string) by the rule above."""
    got = extract_answer(text)
    return got is not None and got == int(reference)


# --------------------------------------------------------------------------- pre-training corpus
def _fact_lines(rng: random.Random) -> List[str]:
    """Every one-column step the solutions use, in the solutions' wording."""
    lines = []
    for x in range(10):
        for y in range(10):
            for c in (0, 1):
                v = x + y + c
                lines.append(f"{x} + {y} + {c} = {v}, write {v % 10} carry {v // 10}")
                v = x - y - c
                d, nc = (v, 0) if v >= 0 else (v + 10, 1)
                lines.append(f"{x} - {y} - {c} = {v}, write {d} borrow {nc}")
            for c in range(9):
                v = x * y + c
                lines.append(f"{x} x {y} + {c} = {v}, write {v % 10} carry {v // 10}")
    rng.shuffle(lines)
    return lines


def _spelling_lines(rng: random.Random, n_random: int) -> List[str]:
    """Numbers spelled into digits and back, both directions: all of 0..999 (every chunk of up to
    three digits the tokenizer can produce) plus ``n_random`` random four-digit numbers."""
    nums = list(range(1000)) + [rng.randrange(1000, 10000) for _ in range(n_random)]
    out = [f"{n} = {spell(n)}" for n in nums] + [f"{spell(n)} = {n}" for n in nums]
    rng.shuffle(out)
    return out


def pretrain_documents(problems: Sequence[Problem], seed: int, fact_repeats: int = 2,
                       lines_per_document: int = 40) -> List[str]:
    """Plain-text documents: one per worked solution of ``problems`` (``Question: ...`` then the
    solution), and number-fact documents of ``lines_per_document`` lines (``fact_repeats`` passes
    over all one-column steps and all spelled numbers, freshly shuffled each pass). Shuffled."""
    rng = random.Random(f"{seed}/pretrain")
    docs = [f"Question: {p.question}\nSolution:\n{worked_solution(p)}" for p in problems]
    for _ in range(fact_repeats):
        lines = _fact_lines(rng) + _spelling_lines(rng, 500)
        rng.shuffle(lines)
        for i in range(0, len(lines), lines_per_document):
            docs.append("\n".join(lines[i:i + lines_per_document]))
    rng.shuffle(docs)
    return docs
