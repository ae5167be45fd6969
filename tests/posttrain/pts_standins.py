"""Stand-ins for the Pivotal Token Search tool's tests: a tiny random model on a trimmed vocabulary
of single characters, and a rule-based oracle with the ``Oracle`` interface of
``megatron_phi4.posttrain.oracles`` (``check(candidate, reference) -> result with .passed,
.reason``), importable by ``--oracle tests.posttrain.pts_standins:FirstOfOracle`` from a subprocess.

The oracle's rule makes pivots known in advance: reference ``"abcdefgh>ijklmnop"`` passes a response
in which a character of the first set appears before any character of the second. The first such
character a solution contains is therefore pivotal: after it every rollout passes (or fails) --
p jumps to exactly 1 (or 0) -- whatever the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = 64  # model rows: the mapped ids first, the rest are padding rows (they decode to U+FFFD)
REFERENCE = "abcdefgh>ijklmnop"


@dataclass(frozen=True)
class Result:
    passed: bool
    reason: str


class FirstOfOracle:
    """See the module docstring. The environment variable ``PTS_TEST_KILL_ON_CALL=N`` makes the Nth
    check (counted over the oracle's life) raise KeyboardInterrupt: a run killed mid-question."""

    name = "first_of"

    def __init__(self):
        self.kill_on_call, self.calls = int(os.environ.get("PTS_TEST_KILL_ON_CALL", 0)) or None, 0

    @staticmethod
    def parse_reference(reference: str) -> tuple[str, str]:
        good, sep, bad = reference.partition(">")
        if not sep or not good or not bad or set(good) & set(bad):
            raise ValueError(f"first_of oracle: reference {reference!r} is not 'GOOD>BAD' (two disjoint sets)")
        return good, bad

    def check(self, candidate: str, reference: str) -> Result:
        self.calls += 1
        if self.kill_on_call == self.calls:
            raise KeyboardInterrupt("killed by the test")
        good, bad = FirstOfOracle.parse_reference(reference)
        for ch in candidate:
            if ch in good:
                return Result(True, f"{ch!r} comes first")
            if ch in bad:
                return Result(False, f"{ch!r} comes first")
        return Result(False, "neither set appears")


class LateBadReferenceOracle(FirstOfOracle):
    """The same rule, without ``parse_reference``: a bad reference shows only when checking."""

    parse_reference = None

    def check(self, candidate, reference):
        return super().check(candidate, reference)


def phi4_ids(extra_ids=()) -> list[int]:
    """The trimmed vocabulary: every character of CHARS, the chat control tokens, and ``extra_ids``."""
    from megatron_phi4.tokenizer import EOD_ID, IM_END_ID, IM_SEP_ID, IM_START_ID, PAD_ID, get_tokenizer

    tok = get_tokenizer()
    ids = {i for c in CHARS for i in tok.encode(c)} | {EOD_ID, IM_END_ID, IM_SEP_ID, IM_START_ID, PAD_ID}
    ids |= set(extra_ids)
    assert len(ids) <= VOCAB
    return sorted(ids)


def write_vocab_json(path, ids) -> str:
    """The map in the trimmed-vocabulary file format (megatron_phi4.demo.trimmed_vocab)."""
    d = {"format": "megatron_phi4.trimmed_vocab", "version": 1, "phi4_vocab_size": 100352,
         "vocab_size": VOCAB, "num_used": len(ids), "phi4_ids": list(ids)}
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(d, f)
    return os.path.join(path, "vocab.json")


def save_tiny_model(path, seed: int = 0, head_scale: float = 5.0) -> str:
    """A random 2-layer model on the VOCAB-row vocabulary, saved as a project checkpoint. The LM head
    is scaled up so next-token distributions are peaked enough to differ between prefixes."""
    import torch

    from megatron_phi4.checkpoint.format import save_model_weights
    from megatron_phi4.config import model_preset
    from megatron_phi4.models.phi4.model import build_model

    cfg = model_preset("tiny", vocab_size=VOCAB, num_layers=2, max_seq_length=128)
    model = build_model(cfg, "cpu", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    save_model_weights(model.state_dict(), path, cfg)
    return str(path)
