"""Oracles that decide whether a rollout is right: exact numbers, multiple-choice letters, and
program tests run in a sandbox.

Every oracle has ``check(candidate, reference) -> OracleResult(passed, reason, ...)`` and
``check_many(candidates, references)``. Tools pick one by name::

    from megatron_phi4.posttrain.oracles import build_oracle
    oracle = build_oracle("code", timeout_s=5)      # or "numeric", "multiple_choice"
    oracle.check_many(rollouts, reference)

Importing this package loads only the standard library (no torch).
"""
from megatron_phi4.posttrain.oracles.answers import MultipleChoiceOracle, NumericAnswerOracle, extract_number, parse_number
from megatron_phi4.posttrain.oracles.base import Oracle, OracleResult
from megatron_phi4.posttrain.oracles.code import CodeOracle, extract_program
from megatron_phi4.posttrain.oracles.sandbox import SandboxError, SandboxLimits, SandboxUnavailable
from megatron_phi4.registry import Registry

# Oracle kinds a tool or recipe can name (``--oracle numeric``); values take the oracle's keywords.
ORACLES = Registry("oracle", {
    NumericAnswerOracle.name: NumericAnswerOracle,
    MultipleChoiceOracle.name: MultipleChoiceOracle,
    CodeOracle.name: CodeOracle,
})


def build_oracle(name: str, **options) -> Oracle:
    """The oracle registered as ``name``, built with ``options``; unknown names raise
    UnknownEntryError listing the registered ones."""
    return ORACLES.build(name, **options)


__all__ = ["Oracle", "OracleResult", "NumericAnswerOracle", "MultipleChoiceOracle", "CodeOracle",
           "SandboxLimits", "SandboxError", "SandboxUnavailable", "ORACLES", "build_oracle",
           "extract_number", "parse_number", "extract_program"]
