"""A deliberately simple decoding loop for the demo tests (NOT the project's sampler).

The library's generation is ``megatron_phi4.generation.generate``; these tests must not depend on
it, so they decode with this loop, which follows the same contract: ``generate(model, prompts, *,
max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, num_samples=1, stop_token_ids=None,
seed=None)`` -> per prompt a list of ``num_samples`` results with ``.token_ids`` (new tokens, up
to and including the stop token) and ``.logprobs``. Prompts of equal length are decoded together
with one KV cache (the model's cache keeps one length for all rows); temperature 0 is argmax,
otherwise plain softmax sampling from a seeded generator (top-p / top-k are not supported here).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Sample:
    token_ids: List[int]
    logprobs: List[float]


@torch.no_grad()
def simple_generate(model, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                    num_samples=1, stop_token_ids=None, seed=None):
    if top_p != 1.0 or top_k != 0:
        raise NotImplementedError("simple_generate: top_p / top_k are not supported")
    stop = set(int(t) for t in (stop_token_ids or []))
    gen = torch.Generator().manual_seed(int(seed or 0))
    out = [[None] * num_samples for _ in prompts]
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        for s in range(num_samples):
            groups[len(p)].append((i, s))
    for length in sorted(groups):
        rows = groups[length]
        tokens = torch.tensor([prompts[i] for i, _ in rows], dtype=torch.long)
        cache = model.create_kv_cache(len(rows), length + max_new_tokens)
        logits = model(tokens, kv_cache=cache)[:, -1].float()
        new = [[] for _ in rows]
        lps = [[] for _ in rows]
        done = torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            if temperature == 0.0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            for r in range(len(rows)):
                if not done[r]:
                    t = int(nxt[r])
                    new[r].append(t)
                    lps[r].append(float(logp[r, t]))
                    if t in stop:
                        done[r] = True
            if bool(done.all()):
                break
            logits = model(nxt[:, None], kv_cache=cache)[:, -1].float()
        for r, (i, s) in enumerate(rows):
            out[i][s] = Sample(new[r], lps[r])
    return out
