"""Choosing the next token: temperature, top-k, top-p, and reproducible per-sample randomness.

Two properties matter for rollouts (Pivotal Token Search estimates success probabilities from many
of them):

* **The same seed gives the same tokens whatever the batch.** Every sample owns its random stream:
  a CPU ``torch.Generator`` seeded from ``(base seed, sample index)`` through numpy's
  ``SeedSequence`` (which mixes the pair into a well-spread 64-bit seed). A sample draws one uniform
  number per token it generates, and nothing else draws from its stream, so its tokens do not
  depend on which other prompts or samples share the batch, on the batch order, on the device
  (the draws are on the CPU) or on the tensor-parallel layout.
* **Sampling is by inverse CDF** (one uniform per token, compared with the cumulative
  probabilities in float64) rather than ``torch.multinomial``, whose draws are neither
  per-row-seedable nor identical across devices.

The filters follow ``transformers``' order and semantics (temperature, then top-k keeping every
token tied with the k-th logit, then top-p keeping the smallest set of most likely tokens whose
probability reaches ``top_p``); tests compare them with its logits warpers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_phi4.tokenizer import EOD_ID, IM_END_ID

__all__ = ["SamplingParams", "GenerationError", "sample_seed", "SampleStreams", "filtered_probs",
           "choose_tokens"]

DEFAULT_STOP_TOKEN_IDS = (IM_END_ID, EOD_ID)  # <|im_end|> (100265), <|endoftext|> (100257)


class GenerationError(ValueError):
    """Invalid generation arguments; the message names the argument and the allowed values."""


@dataclass(frozen=True)
class SamplingParams:
    """Validated arguments of :func:`megatron_phi4.generation.generate` (see its docstring)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_TOKEN_IDS

    def __post_init__(self):
        def bad(name, value, allowed):
            raise GenerationError(f"{name}: got {value!r}, allowed: {allowed}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an int >= 0 (0 = no top-k filter)")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples < 1:
            bad("num_samples", self.num_samples, "an int >= 1")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                bad("stop_token_ids", list(self.stop_token_ids), "a list of non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_seed(base_seed: int, sample_index: int) -> int:
    """The 64-bit seed of sample ``sample_index`` drawn under ``base_seed``."""
    state = np.random.SeedSequence([int(base_seed), int(sample_index)]).generate_state(2, np.uint32)
    return int(state[0]) | (int(state[1]) << 32)


class SampleStreams:
    """One CPU random stream per batch row; ``uniforms(rows)`` draws one number for each given row."""

    def __init__(self, seeds: Sequence[int]):
        self._gens = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(s))
            self._gens.append(g)

    def uniforms(self, rows: Sequence[int]) -> torch.Tensor:
        out = torch.empty(len(rows), dtype=torch.float64)
        for k, r in enumerate(rows):
            out[k] = torch.rand((), dtype=torch.float64, generator=self._gens[r])
        return out


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution ``(probs, order)`` of fp32 ``logits`` (rows, vocab).

    ``probs`` (float64) sums to one per row over the kept tokens (removed ones are 0). ``order`` is
    None when the columns are in vocabulary order, else the vocabulary id of each column (a top-p
    filter sorts them, most likely first, ties in vocabulary order).
    """
    scaled = logits.float() / temperature
    if top_k and top_k < scaled.shape[-1]:
        # Like transformers, keep every token tied with the k-th largest logit.
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    order = None
    if top_p < 1.0:
        scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
        # Keep token i (most likely first) while the probability of the tokens before it is below
        # top_p: the smallest set reaching top_p, never empty (nothing precedes the first).
        probs = torch.softmax(scaled.double(), dim=-1)
        before = probs.cumsum(-1) - probs
        scaled = scaled.masked_fill(before >= top_p, float("-inf"))
    probs = torch.softmax(scaled.double(), dim=-1)
    return probs, order


def choose_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens of every row of full-vocabulary ``logits`` (rows, vocab) and their log-probs.

    Returns ``(token_ids, logprobs)``; ``logprobs`` is the model's own log-probability of each chosen
    token at temperature 1, before any filter (what Pivotal Token Search splits on), in fp32.
    ``uniforms`` (rows,), one per row in [0, 1), is required unless greedy.
    """
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(dim=-1)  # first maximal id on ties, like transformers
    else:
        probs, order = filtered_probs(logits, params.temperature, params.top_k, params.top_p)
        cdf = probs.cumsum(-1)
        u = uniforms.to(device=cdf.device, dtype=torch.float64).unsqueeze(-1) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        tokens = pick.squeeze(-1) if order is None else order.gather(-1, pick).squeeze(-1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs
