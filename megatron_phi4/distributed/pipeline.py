"""Pipeline parallelism: the stage split and the schedules (``torch.distributed.pipelining``).

Split: contiguous layers per stage; stage 0 also owns the embedding, the last stage the final norm
and the LM head (the model spec builds a stage's module from its layer ids). ``split_layers`` honours ``pp_layers_per_stage`` or balances
``layers + embedding_cost (first) + head_cost (last)`` (min-max cost, then the most even).

Placement: ``pp * virtual_stages`` stages, stage s on pipeline rank ``s % pp`` (the looping
placement ScheduleInterleaved1F1B expects); a rank's chunks are ``[r, r + pp, r + 2 pp, ...]``.

Schedules: ``torch.distributed.pipelining`` (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B,
ScheduleInterleavedZeroBubble) driven with *static* stage metadata (shapes are known, so no
shape-inference pass and no extra forward/backward at start-up). A schedule object is cached per
(mode, micro-batch shape, number of micro-batches).

Losses: the schedules call ``loss_fn(output, target)`` with a fixed target tensor; the trainer's
losses need the whole micro-batch (labels, loss_mask, DPO reference log-probs, weights). The
"target" handed to the schedule is therefore the micro-batch *index* (``arange(n)`` split into n
chunks), and the runner's loss callback looks the micro-batch up. ``position_ids`` and
``document_ids`` (and ``labels``, when the loss takes label log-probs from the head) travel as
keyword arguments, which the schedule gives to every stage.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def split_layers(num_layers: int, num_stages: int, layers_per_stage: list[int] | None = None,
                 embedding_cost: float = 0.0, head_cost: float = 0.0) -> list[list[int]]:
    """Global layer indices of every stage (contiguous, each stage >= 1 layer)."""
    if layers_per_stage is not None:
        if len(layers_per_stage) != num_stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
            raise ValueError(f"pp_layers_per_stage={layers_per_stage} does not split {num_layers} layers "
                             f"into {num_stages} non-empty stages")
        counts = list(layers_per_stage)
    else:
        if num_layers < num_stages:
            raise ValueError(f"{num_stages} pipeline stages but only {num_layers} layers")

        def cost(stage: int, n: int) -> float:
            return n + (embedding_cost if stage == 0 else 0.0) + (head_cost if stage == num_stages - 1 else 0.0)

        # best[s][i]: (max cost, sum of squares, counts) splitting layers[i:] into stages s..S-1.
        inf = (float("inf"), float("inf"), [])
        best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
        best[num_stages][num_layers] = (0.0, 0.0, [])
        for s in range(num_stages - 1, -1, -1):
            remaining = num_stages - s - 1
            for i in range(num_layers - 1, -1, -1):
                cand = inf
                for n in range(1, num_layers - i - remaining + 1):
                    mx, sq, rest = best[s + 1][i + n]
                    if mx == float("inf"):
                        continue
                    c = cost(s, n)
                    key = (max(mx, c), sq + c * c, [n] + rest)
                    if key[:2] < cand[:2]:
                        cand = key
                best[s][i] = cand
        counts = best[0][0][2]
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def stages_of_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    return [pp_rank + k * pp for k in range(virtual_stages)]


def schedule_class(name: str, n_local_stages: int):
    """The ``torch.distributed.pipelining`` schedule registered as ``name`` (``parallel.pp_schedule``)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    from megatron_phi4.registry import PIPELINE_SCHEDULES

    cls = PIPELINE_SCHEDULES.get(name, "parallel.pp_schedule")
    if n_local_stages > 1 and cls in (ScheduleGPipe, Schedule1F1B):
        raise ValueError(f"pp_schedule {name!r} runs one stage per rank, got {n_local_stages}")
    return cls


def _contiguous_output(module, args, output):
    return output.contiguous()


class PipelineRunner:
    """Runs micro-batches through this rank's stages with a torch.distributed.pipelining schedule."""

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], num_stages: int, pp_group,
                 schedule: str, device: torch.device, hidden_size: int, local_vocab: int,
                 seq_divisor: int, act_dtype: torch.dtype, logits_dtype: torch.dtype | None = None):
        self.parts, self.stage_ids, self.num_stages = parts, stage_ids, num_stages
        self.pp_group, self.schedule_name, self.device = pp_group, schedule, device
        self.hidden_size, self.local_vocab = hidden_size, local_vocab
        # Hidden states between stages and the last stage's logits (they differ under autocast:
        # fp32 residual stream, bf16 logits; see mixed_precision.py).
        self.seq_divisor, self.act_dtype = seq_divisor, act_dtype
        self.logits_dtype = logits_dtype or act_dtype
        self._cache: dict = {}
        for part in parts:  # p2p sends need contiguous buffers (SP collectives return permuted views)
            part.register_forward_hook(_contiguous_output)
        self._loss_cb: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def _schedule_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss_cb(output, int(target.reshape(-1)[0].item()))

    def _stage_meta(self, stage_id: int, mb: int, seq: int, train: bool, inputs: str):
        # Static metadata: requires_grad marks which activations get a gradient sent back. The last
        # stage returns this rank's logits shard, or (given the labels) fp32 log p(label) per token.
        hidden = torch.empty(mb, seq // self.seq_divisor, self.hidden_size, dtype=self.act_dtype, device="meta",
                             requires_grad=train)
        inp = torch.empty(mb, seq, dtype=torch.long, device="meta") if stage_id == 0 else hidden
        if stage_id != self.num_stages - 1:
            out = hidden
        elif inputs == "label_log_probs":
            out = torch.empty(mb, seq, dtype=torch.float32, device="meta", requires_grad=train)
        else:
            out = torch.empty(mb, seq, self.local_vocab, dtype=self.logits_dtype, device="meta", requires_grad=train)
        return inp, out

    def _get_schedule(self, train: bool, mb: int, seq: int, n_mb: int, inputs: str):
        key = (train, mb, seq, n_mb, inputs)
        if key in self._cache:
            return self._cache[key]
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        stages = []
        for part, sid in zip(self.parts, self.stage_ids):
            inp, out = self._stage_meta(sid, mb, seq, train, inputs)
            stages.append(PipelineStage(part, sid, self.num_stages, self.device, input_args=inp, output_args=out,
                                        group=self.pp_group))
        cls = schedule_class(self.schedule_name, len(stages))
        if len(stages) == 1 and (not train or n_mb < self.num_stages) and cls is not ScheduleGPipe:
            # 1F1B needs n_microbatches >= stages; for forward-only passes the order does not matter.
            cls = ScheduleGPipe
        if len(stages) == 1:
            sched = cls(stages[0], n_mb, loss_fn=self._schedule_loss, scale_grads=False)
        else:
            sched = cls(stages, n_mb, loss_fn=self._schedule_loss, scale_grads=False)
        logger.info("pipeline: %s for %d micro-batches of %dx%d (%s)", type(sched).__name__, n_mb, mb, seq,
                    "train" if train else "eval")
        self._cache[key] = sched
        return sched

    def run(self, microbatches: list[dict[str, torch.Tensor]], loss_cb, train: bool, inputs: str = "logits") -> None:
        """Forward (and backward if ``train``) of all micro-batches; ``loss_cb(output, index)`` runs on
        the last stage and returns the scalar to differentiate. ``inputs``: the last stage's output,
        "logits" or "label_log_probs" (the labels then travel to every stage like ``position_ids``)."""
        shapes = {tuple(mb["input_ids"].shape) for mb in microbatches}
        if len(shapes) != 1:
            raise ValueError(f"pipeline parallelism needs micro-batches of one shape per step, got {sorted(shapes)}")
        mb_size, seq = shapes.pop()
        n = len(microbatches)
        sched = self._get_schedule(train, mb_size, seq, n, inputs)
        self._loss_cb = loss_cb
        args = (torch.cat([mb["input_ids"] for mb in microbatches]),) if 0 in self.stage_ids else ()
        keys = ("position_ids", "document_ids") + (("labels",) if inputs == "label_log_probs" else ())
        kwargs = {k: torch.cat([mb[k] for mb in microbatches]) for k in keys if microbatches[0].get(k) is not None}
        target = torch.arange(n, device=self.device)
        try:
            if train:
                sched.step(*args, target=target, return_outputs=False, **kwargs)
            else:
                with torch.no_grad():
                    sched.eval(*args, target=target, **kwargs)
        finally:
            self._loss_cb = None
