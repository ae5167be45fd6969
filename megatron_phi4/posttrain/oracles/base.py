"""The interface every oracle shares: ``check(candidate, reference) -> OracleResult``.

Pivotal Token Search estimates p(success | prefix) by sampling completions and asking an oracle
whether each one is right (the Phi-4 report, section 4.3: a test suite for code, the ground truth
for math). The search only needs a yes/no per rollout, so the interface is one method; the reason
string is for people reading the JSONL records and debugging a task. ``check_many`` exists because
PTS checks rollouts by the thousand: the code oracle overrides it with a bounded pool of sandboxes.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Sequence


@dataclass(frozen=True)
class OracleResult:
    """``passed``: the verdict. ``reason``: why, in one line. ``extracted``: the answer the oracle
    read from the response (canonical form; None when it found none, and for code). ``stdout`` /
    ``stderr``: the program's output, capped (code oracle only)."""

    passed: bool
    reason: str
    extracted: str | None = None
    stdout: str = ""
    stderr: str = ""

    def __bool__(self) -> bool:
        return self.passed


class Oracle(abc.ABC):
    """Judges one candidate (a model response, or a program) against a reference (an answer, or
    tests). Implementations are stateless per call and safe to call from several threads."""

    name: ClassVar[str]

    @abc.abstractmethod
    def check(self, candidate: str, reference: str) -> OracleResult:
        """Bad references (not a number, not a choice, tests that do not compile) raise ValueError:
        they are the caller's data error, not a wrong rollout."""

    def check_many(self, candidates: Sequence[str], references: str | Sequence[str]) -> list[OracleResult]:
        """One result per candidate, in order. ``references`` is one reference for all (the usual
        PTS case: many rollouts of one question) or one per candidate."""
        refs = broadcast_references(candidates, references)
        return [self.check(c, r) for c, r in zip(candidates, refs)]


def broadcast_references(candidates: Sequence[str], references: str | Sequence[str]) -> list[str]:
    if isinstance(candidates, str):
        raise TypeError("check_many: candidates must be a sequence of strings, got one string")
    if isinstance(references, str):
        return [references] * len(candidates)
    references = list(references)
    if len(references) != len(candidates):
        raise ValueError(f"check_many: got {len(candidates)} candidates but {len(references)} references; "
                         "pass one reference per candidate or a single string for all")
    return references


def require_str(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value
