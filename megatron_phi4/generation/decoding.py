"""Batched sampling from a Phi-4 model with a KV cache: many rollouts of one prefix, cheaply.

Design (why it looks the way it does):

* **No padding, ever.** The model's KV cache gives every row of a batch one shared length and the
  model builds its own causal mask, so left-padded rows would attend to their pad keys. Instead we
  batch the way Meta's LLaMA reference ``generate`` does: the first ``min(prompt lengths)`` tokens of
  every prompt are prefilled together, and a longer prompt then feeds its remaining prompt tokens
  one per decoding step while shorter ones already generate. Every cache slot of a row holds that
  row's own token at its own position, so each row computes exactly what it would alone. Prompts
  whose lengths differ by more than half of ``max_new_tokens`` go to separate batches, so the
  token-by-token catch-up never costs more than half of the decoding it saves.
* **A prefix is computed once.** A prompt is prefilled at batch size one and its cache is repeated
  ``num_samples`` times (``KVCache.repeat_batch``); ``share_prefix=False`` (benchmarks, tests)
  recomputes it for every sample instead.
* **Finished rows leave the batch.** When a quarter of the rows have stopped, their cache rows are
  dropped so long rollouts do not pay for short ones.
* **Tensor parallelism**: a TP model (``ParallelEngine(...).model_parts[0]``) returns this rank's
  vocabulary shard of the logits; the last position's shards (``rows x vocab``: small) are
  all-gathered so every TP rank holds the same full logits, draws the same uniforms and therefore
  takes the same tokens and the same control flow as one process would.
* **Randomness** is per sample (see :mod:`megatron_phi4.generation.sampling`), so a sample's tokens
  depend on its seed and prompt only.

``logprobs``: the model's own log-probability (temperature 1, no top-k/top-p filter) of each
generated token, in fp32: the quantity Pivotal Token Search splits on, and what a DPO reference
model would assign. The distribution actually sampled from (temperature, filters) is not returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_phi4.generation.sampling import (
    DEFAULT_STOP_TOKEN_IDS,
    GenerationError,
    SampleStreams,
    SamplingParams,
    choose_tokens,
    sample_seed,
)

__all__ = ["Sample", "generate", "generate_with_params", "vocab_parallel_group"]

PREFILL_CHUNK = 2048  # prompt tokens per prefill forward (bounds its activations)
COMPACT_FRACTION = 0.25  # drop finished rows from the batch once this fraction of it has stopped


@dataclass
class Sample:
    """One generated continuation: new tokens only (the stop token included when one was produced)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # model log-prob (temperature 1) per token
    finish_reason: str = "length"  # "stop" (a stop token was generated) or "length" (max_new_tokens)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
             stop_token_ids: Sequence[int] | None = None,
             seed: int | Sequence[int] | None = None) -> list[list[Sample]]:
    """Sample ``num_samples`` continuations of every prompt; returns ``[prompt][sample] -> Sample``.

    model: a ``Phi4Model`` (``megatron_phi4.load_model``) on CPU or GPU, or a tensor-parallel one
        (``ParallelEngine(...).model_parts[0]``; call on every rank of its TP group).
    prompts: token-id lists (non-empty), of any lengths.
    temperature: 0 = greedy (argmax, first id on ties); top_p in (0, 1]; top_k 0 = off.
    stop_token_ids: a row stops after producing one of them (it is kept in ``token_ids``);
        default ``<|im_end|>`` (100265) and ``<|endoftext|>`` (100257).
    seed: None (fresh randomness, drawn from torch's global generator: ``torch.manual_seed`` fixes
        it), an int (every prompt's sample j uses the stream of ``(seed, j)``), or one int per
        prompt. The same seed and prompt give the same tokens whatever else is in the batch, on CPU
        and GPU and under TP; two equal prompts under one int seed therefore get equal samples.

    Returns ``results[i][j]`` (prompt i, sample j), a :class:`Sample`:
        ``token_ids``: the new tokens only (the prompt is not repeated), ending with the stop token
            when one was generated (``finish_reason`` "stop"), else ``max_new_tokens`` long ("length");
        ``logprobs``: one float per token: ``log_softmax(logits)[token]`` of the model's own next-token
            distribution -- temperature 1, before top-k/top-p -- computed in fp32 from the logits
            of the forward pass (in the model's dtype). Not the log-probability under the sampling
            distribution actually used; it is what Pivotal Token Search splits on and what a DPO
            reference model assigns. Greedy samples of one prompt are identical copies.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, num_samples=num_samples,
                            stop_token_ids=_stop_ids(stop_token_ids))
    return generate_with_params(model, prompts, params, seed=seed)


def _stop_ids(stop_token_ids) -> tuple[int, ...]:
    if stop_token_ids is None:
        return DEFAULT_STOP_TOKEN_IDS
    if isinstance(stop_token_ids, int):
        raise GenerationError(f"stop_token_ids: got the int {stop_token_ids}, allowed: a list of token ids")
    return tuple(stop_token_ids)


def vocab_parallel_group(model):
    """The TP group over which ``model``'s LM head splits the vocabulary, or None (full logits)."""
    head = getattr(model, "lm_head", None)
    if head is None:
        raise GenerationError("model: has no LM head (a pipeline stage?); generate needs a whole model "
                              "(pp = 1)")
    group = getattr(head, "group", None)
    if group is None or getattr(head, "gather_output", False) or not dist.is_initialized():
        return None
    return group if dist.get_world_size(group) > 1 else None


@torch.no_grad()
def generate_with_params(model, prompts, params: SamplingParams, *, seed=None, share_prefix: bool = True,
                         ) -> list[list[Sample]]:
    """:func:`generate` with validated :class:`SamplingParams`; ``share_prefix=False`` recomputes
    each prompt for every sample (the baseline the prefix cache is measured against)."""
    prompts = _check_prompts(prompts, model.config.vocab_size)
    need = max(map(len, prompts)) + params.max_new_tokens
    if need > model.config.max_seq_length:
        raise GenerationError(f"max_new_tokens: the longest prompt ({max(map(len, prompts))} tokens) + "
                              f"max_new_tokens ({params.max_new_tokens}) = {need} exceeds the model's "
                              f"max_seq_length {model.config.max_seq_length}")
    tp_group = vocab_parallel_group(model)
    base_seeds = _base_seeds(seed, len(prompts), tp_group)
    results: list[list[Sample]] = [[] for _ in prompts]
    for group in _length_groups(prompts, params.max_new_tokens):
        out = _generate_group(model, [prompts[i] for i in group], [base_seeds[i] for i in group],
                              params, share_prefix, tp_group)
        for i, samples in zip(group, out):
            results[i] = samples
    return results


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts: expected a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or isinstance(p[0] if p else 0, Sequence):
            raise GenerationError(f"prompts[{i}]: expected a list of token ids, got {type(p).__name__}")
        if not p:
            raise GenerationError(f"prompts[{i}]: is empty (a prompt needs at least one token)")
        ids = []
        for j, t in enumerate(p):
            try:
                t_int = int(t)
            except (TypeError, ValueError):
                raise GenerationError(f"prompts[{i}][{j}]: expected a token id, got {t!r}") from None
            if isinstance(t, bool) or t_int != t or not 0 <= t_int < vocab_size:
                raise GenerationError(f"prompts[{i}][{j}]: token id {t!r} outside [0, {vocab_size})")
            ids.append(t_int)
        out.append(ids)
    return out


def _base_seeds(seed, n: int, tp_group) -> list[int]:
    if seed is None:
        # Fresh randomness, from torch's global generator (so torch.manual_seed fixes it); TP ranks
        # must agree, so rank 0 of the group decides.
        s = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        if tp_group is not None:
            dist.broadcast(s, src=dist.get_global_rank(tp_group, 0), group=tp_group)
        return [int(s)] * n
    seeds = [seed] * n if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise GenerationError(f"seed: got {len(seeds)} seeds for {n} prompts, allowed: None, an int, "
                              f"or one int per prompt")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise GenerationError(f"seed: got {s!r}, allowed: non-negative ints")
    return seeds


def _length_groups(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Prompt indices in batches whose lengths differ by at most ``max_new_tokens // 2``."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(prompts[i]) - len(prompts[groups[-1][0]]) <= max_new_tokens // 2:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _full_vocab_logits(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """(rows, vocab) fp32 logits; under TP the vocabulary shards are all-gathered in rank order."""
    logits = logits.float().contiguous()
    if tp_group is None:
        return logits
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, logits, group=tp_group)
    return torch.cat(shards, dim=-1)


def _last_position_only(module, args):
    return (args[0][:, -1:],) + tuple(args[1:])


def _prefill(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Run ``tokens`` (rows, len) into ``cache``; the last position's logits (rows, vocab shard).

    Only the last position's logits are needed, and the LM head over every prompt position would
    cost more than the decoder layers for a short model with a large vocabulary (and hold
    rows x len x vocab floats): a forward pre-hook hands the head just the last position's hidden
    state (what ``transformers`` does with ``logits_to_keep=1``).
    """
    if getattr(model.lm_head, "input_mode", "copy") == "gather_seq":
        raise GenerationError("model: sequence parallelism is not supported by generate (build the "
                              "engine with sequence_parallel=False)")
    handle = model.lm_head.register_forward_pre_hook(_last_position_only)
    try:
        logits = None
        for start in range(0, tokens.shape[1], PREFILL_CHUNK):
            logits = model(tokens[:, start:start + PREFILL_CHUNK], kv_cache=cache)[:, -1]
    finally:
        handle.remove()
    return logits


def _can_compact(cache) -> bool:
    return isinstance(getattr(cache, "keys", None), dict) and isinstance(getattr(cache, "values", None), dict)


def _keep_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep only the batch rows ``index`` of ``cache`` (in place)."""
    for store in (cache.keys, cache.values):
        for layer, t in store.items():
            store[layer] = t.index_select(0, index)


def _generate_group(model, prompts: list[list[int]], base_seeds: list[int], params: SamplingParams,
                    share_prefix: bool, tp_group) -> list[list[Sample]]:
    device = next(model.parameters()).device
    # Greedy samples are all equal: compute one and copy it.
    n = 1 if params.greedy else params.num_samples
    lens = [len(p) for p in prompts]
    lmin = min(lens)
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]  # (prompt, sample) of each row
    streams = None if params.greedy else SampleStreams([sample_seed(base_seeds[i], j) for i, j in rows])
    stop = set(params.stop_token_ids)

    head = torch.tensor([p[:lmin] for p in prompts], dtype=torch.long, device=device)
    cache_len = max(lens) + params.max_new_tokens
    if share_prefix:
        cache = model.create_kv_cache(len(prompts), cache_len)
        logits = _prefill(model, head, cache)
        if n > 1:
            cache = cache.repeat_batch(n)
            logits = logits.repeat_interleave(n, dim=0)
    else:
        cache = model.create_kv_cache(len(rows), cache_len)
        logits = _prefill(model, head.repeat_interleave(n, dim=0), cache)

    samples = [Sample() for _ in rows]
    alive = list(range(len(rows)))  # the row held by each cache row
    done = [False] * len(rows)
    cur = lmin  # tokens in the cache
    compact = _can_compact(cache)
    while True:
        full = _full_vocab_logits(logits, tp_group)
        ready = [k for k, r in enumerate(alive) if lens[rows[r][0]] <= cur and not done[r]]
        if ready:
            u = None if streams is None else streams.uniforms([alive[k] for k in ready])
            tokens, logps = choose_tokens(full[ready], params, u)
            for k, t, lp in zip(ready, tokens.tolist(), logps.tolist()):
                s = samples[alive[k]]
                s.token_ids.append(t)
                s.logprobs.append(lp)
                if t in stop:
                    s.finish_reason, done[alive[k]] = "stop", True
                elif len(s.token_ids) == params.max_new_tokens:
                    done[alive[k]] = True
        if all(done):
            break
        finished = [k for k, r in enumerate(alive) if done[r]]
        if compact and len(finished) >= max(1, COMPACT_FRACTION * len(alive)):
            keep = [k for k, r in enumerate(alive) if not done[r]]
            _keep_cache_rows(cache, torch.tensor(keep, device=device))
            alive = [alive[k] for k in keep]
        nxt = []
        for r in alive:
            p = prompts[rows[r][0]]
            if cur < len(p):
                nxt.append(p[cur])  # still reading its prompt
            else:
                s = samples[r]
                nxt.append(s.token_ids[-1])  # a finished row's input is ignored
        logits = model(torch.tensor(nxt, dtype=torch.long, device=device)[:, None], kv_cache=cache)[:, -1]
        cur += 1

    out = [[] for _ in prompts]
    for (i, _), s in zip(rows, samples):
        out[i].append(s)
    if n != params.num_samples:  # greedy: copies of the one sample
        out = [[Sample(list(s[0].token_ids), list(s[0].logprobs), s[0].finish_reason)
                for _ in range(params.num_samples)] for s in out]
    return out
