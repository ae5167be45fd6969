"""Held-out task accuracy with a confidence interval: greedy and sampled decoding.

:func:`evaluate_accuracy` generates one completion per held-out problem -- greedy, and sampled at
temperature 0.7 with a seed -- checks each with an answer checker, and reports the fraction right
with its 95% Wilson score interval (:func:`wilson_interval`). Wilson rather than the normal
approximation because accuracies near 0 or 1 on a few hundred problems are exactly where the
normal interval leaves [0, 1] or collapses to a point; Wilson's stays inside and keeps its
coverage (Brown, Cai & DasGupta, "Interval Estimation for a Binomial Proportion", 2001). It needs no
library: ``statsmodels``' ``proportion_confint(method="wilson")`` computes the same numbers, but is
not worth a dependency for one formula.

Generation goes through ``generate_fn`` with the contract of
``megatron_phi4.generation.generate(model, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0,
top_k=0, num_samples=1, stop_token_ids=None, seed=None)`` -> per prompt a list of results with
``.token_ids`` (new tokens only); the default imports that function on first use. Problems are
sent in batches of ``batch_size`` prompts (each batch's seed is derived from ``seed`` and the
batch's first index, so a run is reproducible for a given seed and batch size).

A trimmed-vocabulary model (the demo's) is evaluated in its own ids: pass its ``vocab``; prompts
are the records' ``prompt_ids``, generation stops at the trimmed ``<|im_end|>`` / ``<|endoftext|>``
and completions are decoded through the map (an id that stands for no Phi-4 token decodes as
U+FFFD, which no answer rule accepts). Without ``vocab`` (a full-vocabulary model, e.g. one
exported by :func:`megatron_phi4.demo.vocab_export.expand_checkpoint`) the records'
``meta.phi4_prompt_ids`` and the Phi-4 stop ids are used.

The checker is any ``checker(completion_text, reference) -> truthy``: the default is the task's
answer rule (:func:`megatron_phi4.demo.arithmetic.is_correct`: the last ``\\boxed{}`` as a whole
integer); ``NumericAnswerOracle().check`` of ``megatron_phi4.posttrain.oracles`` fits as it is (its
result is truthy when the answer passed).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["Accuracy", "EvalResult", "wilson_interval", "evaluate_accuracy", "MIN_PROBLEMS"]

MIN_PROBLEMS = 500
_Z95 = 1.959963984540054  # the 97.5% standard-normal quantile


def wilson_interval(correct: int, total: int, z: float = _Z95) -> Tuple[float, float]:
    """The Wilson score interval for ``correct`` successes in ``total`` trials (default 95%)."""
    if total <= 0:
        raise ValueError(f"wilson_interval: total must be positive, got {total}")
    if not 0 <= correct <= total:
        raise ValueError(f"wilson_interval: correct must be in [0, {total}], got {correct}")
    p = correct / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Accuracy:
    correct: int
    total: int
    rate: float
    low: float     # 95% Wilson interval
    high: float

    @classmethod
    def of(cls, correct: int, total: int) -> "Accuracy":
        lo, hi = wilson_interval(correct, total)
        return cls(correct, total, correct / total, lo, hi)

    def __str__(self) -> str:
        return (f"{100 * self.rate:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] "
                f"({self.correct}/{self.total})")


@dataclass
class EvalResult:
    greedy: Optional[Accuracy]
    sampled: Optional[Accuracy]
    temperature: float
    seed: int
    wall_s: float
    # per problem: id, reference, and for each mode whether it was right and the completion text
    records: List[dict] = field(default_factory=list)

    def to_dict(self, with_records: bool = False) -> dict:
        d = asdict(self)
        if not with_records:
            d.pop("records")
        return d


def _default_generate():
    from megatron_phi4.generation import generate  # the project's sampler (KV cache, batching)
    return generate


def evaluate_accuracy(model, problems: Sequence[dict], *, vocab=None,
                      generate_fn: Optional[Callable] = None,
                      checker: Optional[Callable[[str, str], bool]] = None,
                      max_new_tokens: int = 200, temperature: float = 0.7, seed: int = 0,
                      modes: Sequence[str] = ("greedy", "sampled"), batch_size: int = 128,
                      min_problems: int = MIN_PROBLEMS, tokenizer=None,
                      log: Optional[Callable[[str], None]] = print) -> EvalResult:
    """Accuracy of ``model`` on ``problems`` (records of a problem file: ``prompt_ids`` /
    ``meta.phi4_prompt_ids`` and ``reference``; see :mod:`megatron_phi4.demo.arithmetic_data`), for
    each of ``modes`` ("greedy": temperature 0; "sampled": ``temperature``, seeded). Refuses fewer
    than ``min_problems`` problems: an interval over a handful says little."""
    from megatron_phi4.tokenizer import get_tokenizer

    for m in modes:
        if m not in ("greedy", "sampled"):
            raise ValueError(f"modes: got {m!r}, allowed: 'greedy', 'sampled'")
    if len(problems) < min_problems:
        raise ValueError(f"evaluate_accuracy: {len(problems)} problems < min_problems={min_problems}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("evaluate_accuracy: batch_size and max_new_tokens must be >= 1")
    prompts_all = []
    for i, rec in enumerate(problems):
        ids = rec.get("prompt_ids") if vocab is not None else (rec.get("meta") or {}).get("phi4_prompt_ids")
        if ids is None or "reference" not in rec:
            want = "prompt_ids" if vocab is not None else "meta.phi4_prompt_ids"
            raise ValueError(f"problem {i} ({rec.get('id', '?')}): needs {want!r} and 'reference'")
        prompts_all.append([int(t) for t in ids])
    tok = tokenizer or get_tokenizer()
    generate = generate_fn or _default_generate()
    check = checker
    if check is None:
        from megatron_phi4.demo.arithmetic import is_correct as check
    stop = list(vocab.stop_token_ids) if vocab is not None else [tok.im_end_id, tok.eod_id]

    def decode(ids) -> str:
        ids = [int(t) for t in ids if int(t) not in stop]
        return vocab.decode(ids, tok, errors="replace") if vocab is not None else tok.decode(ids)

    t0 = time.time()
    records = [{"id": r.get("id", i), "reference": str(r["reference"])} for i, r in enumerate(problems)]
    acc = {}
    for mode in modes:
        temp = 0.0 if mode == "greedy" else float(temperature)
        correct = 0
        for start in range(0, len(problems), batch_size):
            batch = problems[start:start + batch_size]
            prompts = prompts_all[start:start + batch_size]
            kwargs = dict(max_new_tokens=max_new_tokens, temperature=temp, stop_token_ids=stop)
            if mode == "sampled":
                kwargs["seed"] = int(seed) * 1_000_003 + start
            outs = generate(model, prompts, **kwargs)
            if len(outs) != len(batch):
                raise RuntimeError(f"generate_fn returned {len(outs)} results for {len(batch)} prompts")
            for j, (rec, out) in enumerate(zip(batch, outs)):
                text = decode(out[0].token_ids)
                ok = bool(check(text, str(rec["reference"])))
                correct += ok
                records[start + j][mode] = {"correct": ok, "text": text}
            if log is not None:
                done = min(start + batch_size, len(problems))
                log(f"[evaluate] {mode}: {done}/{len(problems)} problems, {correct} right "
                    f"({time.time() - t0:.0f}s)")
        acc[mode] = Accuracy.of(correct, len(problems))
    return EvalResult(greedy=acc.get("greedy"), sampled=acc.get("sampled"), temperature=float(temperature),
                      seed=int(seed), wall_s=time.time() - t0, records=records)
