"""ParallelEngine: one object that owns this rank's model chunks and runs them under TP x PP x DP.

The trainer builds exactly one engine and uses::

    units = engine.global_units(microbatches, loss_fn)        # all-reduced over DP
    out = engine.forward_backward(microbatches, loss_fn, units)
    norm = engine.clip_grad_norm_(max_norm)
    optimizer.step()                                          # optimizer over engine.parameters()

The engine knows no model: a ``ModelSpec`` (``model.arch``) builds each pipeline stage's module
on the configured layer backend (``model.backend``), built for this rank's TP group; every layer
declares how its parameters are sharded, so the engine only intersects those declarations with
FSDP's row split (``distributed/sharding.py``) to name this rank's rectangles of the global
tensors (``local_shards``), to initialize bit-identically to one process, and to count each
element once in the gradient norm.

What the last stage hands a loss follows the loss's ``inputs`` (``losses/base.py``): for LM and DPO
the engine passes the labels into the model and the head returns log p(labels) computed a chunk
of tokens at a time (never the whole logits, also under TP and PP); a loss that reads logits gets
this rank's vocabulary shard.

Loss scaling contract: every micro-batch's ``loss_sum`` is divided by ``global_units`` (the units of
the whole global batch: all DP ranks, all micro-batches) before backward, and all gradient
reductions *sum* (FSDP divide factor 1, SP norm all-reduce, optional DDP-style all-reduce). The
gradient is therefore that of the token-weighted global mean, whatever the split.

Speed on one GPU and beyond (``ParallelConfig``): bf16 compute with fp32 master weights and fp32
gradient reduction with or without FSDP (``distributed/mixed_precision.py``), ``torch.compile`` per
decoder block (``compile``), and with replicated DP the gradient all-reduce overlapped with the
last micro-batch's backward (``overlap_grad_reduce``, ``data_parallel.OverlappedGradReducer``).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from megatron_phi4.config import ModelConfig, ParallelConfig
from megatron_phi4.distributed.data_parallel import (
    OverlappedGradReducer, all_reduce_grads, apply_compile, apply_fsdp, set_grad_sync,
)
from megatron_phi4.distributed.grad_clip import clip_grads_, global_grad_norm
from megatron_phi4.distributed.mixed_precision import apply_autocast, precision_plan
from megatron_phi4.distributed.parallel_dims import ParallelDims
from megatron_phi4.distributed.pipeline import PipelineRunner, split_layers, stages_of_rank
from megatron_phi4.distributed.recompute import apply_recompute
from megatron_phi4.distributed.sharding import (
    ShardCoordinates, ShardInfo, shard_views, sp_grad_params, tp_replicated_params,
)
from megatron_phi4.layers.backend import ParallelContext, build_backend
from megatron_phi4.losses.base import LabelLogProbs, loss_inputs, sequence_log_probs
from megatron_phi4.models.spec import ModelSpec, model_spec


def fp8_amax_group(fp8, dims: ParallelDims):
    """The group FP8 amaxes are reduced over (``model.fp8.amax_reduction``), or None: TP x DP
    (Megatron's default; keeps every replica's scales identical) or the TP group alone. Built only when
    FP8 is on (creating a group is a collective: every rank builds its engine, so every rank calls it)."""
    if not fp8.enabled or dims.world_size == 1:
        return None
    if fp8.amax_reduction == "tp":
        return dims.tp_group if dims.tp > 1 else None
    return dims.tp_dp_group


def global_units(microbatches, loss_fn, dp_group=None, device=None) -> float:
    """Units (tokens for LM, pairs for DPO) of the global batch: this rank's micro-batches summed,
    then all-reduced over the DP group (pass ``dp_group``; None = no reduction). ``device``: where
    the collective runs (a CUDA device under NCCL)."""
    total = torch.zeros((), dtype=torch.float64)
    for mb in microbatches:
        total += float(loss_fn.units(mb))
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        total = total.to(device) if device is not None else total
        dist.all_reduce(total, group=dp_group)
    return float(total)


def _wrap(output: torch.Tensor, inputs: str):
    return LabelLogProbs(output) if inputs == "label_log_probs" else output


class ParallelEngine:
    """This rank's share of the model under the configured 3D layout.

    Args:
        model_cfg, parallel_cfg: the configuration (validated again here, before any collective).
        dims: the layout from ``init_distributed`` / ``ParallelDims.build``.
        seed: initialization seed; the parameters are bit-identical to ``build_model(cfg, seed=seed)``
            sliced into this rank's shards (drawn one full tensor at a time, see ``_init_from_seed``).
            None leaves the parameters uninitialized (benchmarks that fill them on the device: drawing
            14B values on the host takes minutes); the caller must write every parameter.
        device: defaults to ``dims.device``.
        full_state_dict: load these full tensors (checkpoint names) instead of initializing.
        sync_grads_every_microbatch: (pp == 1 with FSDP) reduce-scatter after every micro-batch instead
            of accumulating unsharded fp32 gradients until the last one: more communication, but
            saves 4 bytes x (params / tp) of memory (see docs/parallelism.md). Under PP the
            pipeline stage always accumulates and reduces once.
        spec: the model spec (default: the one registered as ``model_cfg.arch``).
        grad_bucket_bytes: bucket size of the replicated-DP gradient all-reduce (``dp_shard: none``).
    """

    def __init__(self, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, dims: ParallelDims, *,
                 seed: int = 0, device=None, full_state_dict: dict | None = None,
                 sync_grads_every_microbatch: bool = False, spec: ModelSpec | None = None,
                 grad_bucket_bytes: int = 64 << 20):
        parallel_cfg.validate(model_cfg, dims.world_size)
        self.model_cfg, self.parallel_cfg, self.dims = model_cfg, parallel_cfg, dims
        self.spec = spec or model_spec(model_cfg)
        self.device = torch.device(device) if device is not None else dims.device
        self.tp, self.pp, self.dp = dims.tp, dims.pp, dims.dp
        self.sequence_parallel = parallel_cfg.sequence_parallel and self.tp > 1
        self.use_fsdp = parallel_cfg.dp_shard == "fsdp"
        self.sync_grads_every_microbatch = sync_grads_every_microbatch
        # bf16 through FSDP2's MixedPrecisionPolicy, or through autocast without FSDP.
        self.precision = precision_plan(parallel_cfg.mixed_precision, self.device, self.use_fsdp)
        self.act_dtype = self.precision.hidden_dtype

        virtual = parallel_cfg.virtual_stages if self.pp > 1 else 1
        self.num_stages = self.pp * virtual
        self.layer_split = split_layers(model_cfg.num_layers, self.num_stages,
                                        parallel_cfg.pp_layers_per_stage if self.pp > 1 else None,
                                        parallel_cfg.pp_embedding_cost, parallel_cfg.pp_head_cost)
        self.stage_ids = stages_of_rank(dims.pp_rank, self.pp, virtual)
        self._global_shapes = dict(self.spec.global_shapes(model_cfg))

        ctx = ParallelContext.from_group(dims.tp_group if self.tp > 1 else None, self.sequence_parallel,
                                         amax_group=fp8_amax_group(model_cfg.fp8, dims))
        backend = build_backend(model_cfg.backend, ctx, fp8=model_cfg.fp8)
        self.where = ShardCoordinates(dims.tp_rank, dims.dp_rank, self.dp, self.use_fsdp)
        self.layout: dict = {}
        self.model_parts: list[nn.Module] = []
        for sid in self.stage_ids:
            with torch.device("meta"):
                part = self.spec.build_stage(model_cfg, backend, self.layer_split[sid],
                                             embedding=sid == 0, head=sid == self.num_stages - 1)
            self.layout.update(part.checkpoint_layout())  # declared before FSDP wraps the parameters
            apply_recompute(self.spec.blocks(part), parallel_cfg.recompute, self.spec.selective_recompute)
            if parallel_cfg.compile:  # after recompute, before FSDP (see apply_compile)
                apply_compile(self.spec.blocks(part), parallel_cfg.compile_backend)
            if self.use_fsdp:
                # Under PP each micro-batch's backward comes later in the schedule: keeping the gathered
                # parameters after forward avoids an all-gather per micro-batch (torchtitan does the same).
                apply_fsdp(part, self.spec.blocks(part), dims.dp_mesh, param_dtype=self.precision.fsdp_param_dtype,
                           reduce_dtype=self.precision.reduce_dtype, reshard_after_forward=self.pp == 1)
            if self.precision.autocast_dtype is not None:
                apply_autocast(part, self.precision.autocast_dtype, self.device.type)
            part.to_empty(device=self.device)
            self.model_parts.append(part)
        self._sp_params = sp_grad_params(self.layout) if self.sequence_parallel else []
        self._tp_replicated = tp_replicated_params(self.layout)

        self._runner = None
        if self.pp > 1:
            self._runner = PipelineRunner(
                self.model_parts, self.stage_ids, self.num_stages, dims.pp_group, parallel_cfg.pp_schedule,
                self.device, model_cfg.hidden_size, model_cfg.vocab_size // self.tp,
                self.tp if self.sequence_parallel else 1, self.precision.hidden_dtype, self.precision.logits_dtype)
        self._metric_names: dict[type, list[str]] = {}

        if full_state_dict is not None:
            self.load_full_state_dict(full_state_dict)
        elif seed is not None:
            self._init_from_seed(seed)

        # Replicated DP: all-reduce gradient buckets while the last micro-batch's backward still runs.
        # Under PP the schedule owns backward (the zero-bubble weight pass fills .grad without the
        # accumulate hooks), so the pipeline keeps the single bucketed all-reduce after it.
        self._grad_reducer = None
        if not self.use_fsdp and self.dp > 1 and self.pp == 1 and parallel_cfg.overlap_grad_reduce:
            self._grad_reducer = OverlappedGradReducer(self.parameters(), dims.dp_group, bucket_bytes=grad_bucket_bytes,
                                                       reduce_dtype=self.precision.reduce_dtype)
        self._grad_bucket_bytes = grad_bucket_bytes

    # ------------------------------------------------------------------ parameters and shards
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their local (backend) names."""
        for part in self.model_parts:
            yield from part.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def shard_views(self, tensors: dict[str, torch.Tensor], suffix: str = "") -> dict[str, tuple[torch.Tensor, ShardInfo]]:
        """{checkpoint name + suffix: (view, ShardInfo)} for tensors shaped like this rank's
        parameters, keyed by local parameter name (the parameters, or optimizer moments)."""
        return shard_views(tensors, self.layout, self.where, suffix=suffix)

    def local_shards(self) -> dict[str, tuple[torch.Tensor, ShardInfo]]:
        """{checkpoint name: (view of this rank's rectangle, ShardInfo)} for every tensor it holds."""
        return self.shard_views({n: p.detach() for n, p in self.named_parameters()})

    def shard_info(self, name: str) -> ShardInfo:
        return self.local_shards()[name][1]

    @staticmethod
    def _slice(full: torch.Tensor, local: torch.Tensor, info: ShardInfo) -> torch.Tensor:
        idx = tuple(slice(o, o + n) for o, n in zip(info.global_offset, local.shape))
        return full[idx]

    @torch.no_grad()
    def _init_from_seed(self, seed: int) -> None:
        """Bit-identical to ``build_model(cfg, seed=seed)`` followed by slicing, without ever holding
        the full model: the full tensors are drawn one at a time, in checkpoint-name order from one
        generator (the spec's initialization rule), and only this rank's rectangles are kept.
        Peak extra memory: one full tensor (the 2 GB embedding for 14B)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shards = self.local_shards()
        for name, shape in self._global_shapes.items():
            full = self.spec.init_tensor(name, torch.empty(shape), self.model_cfg, gen)
            if name in shards:
                local, info = shards[name]
                local.copy_(self._slice(full, local, info).to(local.device, local.dtype))

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy this rank's rectangles out of full tensors (checkpoint names)."""
        for name, (local, info) in self.local_shards().items():
            if name not in sd:
                raise KeyError(f"load_full_state_dict: missing {name!r}")
            if tuple(sd[name].shape) != self._global_shapes[name]:
                raise ValueError(f"load_full_state_dict: {name} has shape {tuple(sd[name].shape)}, "
                                 f"expected {self._global_shapes[name]}")
            local.copy_(self._slice(sd[name], local, info).to(local.device, local.dtype))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 CPU tensors with checkpoint names on every rank (all-gathers every shard: small
        models, tests and export only)."""
        mine = {n: (t.cpu().clone(), info) for n, (t, info) in self.local_shards().items() if not info.replicated}
        gathered: list = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        full: dict[str, torch.Tensor] = {}
        for shards in gathered:
            for name, (t, info) in shards.items():
                if name not in full:
                    full[name] = torch.zeros(info.global_shape, dtype=t.dtype)
                idx = tuple(slice(o, o + n) for o, n in zip(info.global_offset, t.shape))
                full[name][idx] = t
        return {n: full[n] for n in self._global_shapes}

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "ParallelEngine":
        for part in self.model_parts:
            part.train(mode)
        return self

    def eval(self) -> "ParallelEngine":
        return self.train(False)

    def set_rope_theta(self, theta: float) -> None:
        for part in self.model_parts:
            part.set_rope_theta(theta)

    # ------------------------------------------------------------------ running
    def global_units(self, microbatches, loss_fn) -> float:
        return global_units(microbatches, loss_fn, self.dims.dp_group if self.dp > 1 else None, self.device)

    @property
    def _loss_tp_group(self):
        return self.dims.tp_group if self.tp > 1 else None

    def _prepare(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mb = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
        if mb.get("position_ids") is None:
            # Explicit positions: under sequence parallelism a stage sees seq/tp hidden states and could
            # not infer them; with them every stage builds the same RoPE tables.
            b, s = mb["input_ids"].shape
            mb["position_ids"] = torch.arange(s, device=self.device).expand(b, s).contiguous()
        if self.sequence_parallel and mb["input_ids"].shape[1] % self.tp:
            raise ValueError(f"sequence parallelism: sequence length {mb['input_ids'].shape[1]} is not divisible "
                             f"by tp={self.tp}")
        return mb

    def _forward_local(self, mb: dict[str, torch.Tensor], inputs: str) -> torch.Tensor:
        labels = mb["labels"] if inputs == "label_log_probs" else None
        return self.model_parts[0](mb["input_ids"], position_ids=mb["position_ids"],
                                   document_ids=mb.get("document_ids"), labels=labels)

    def _run(self, mbs, loss_cb, train: bool, inputs: str) -> None:
        """``inputs``: what the last stage hands ``loss_cb`` -- "logits" (this rank's vocabulary shard)
        or "label_log_probs" (the model is given the labels; its head returns log p(labels))."""
        if self.pp == 1:
            for i, mb in enumerate(mbs):
                if train:
                    set_grad_sync(self.model_parts, self.sync_grads_every_microbatch or i == len(mbs) - 1)
                    if self._grad_reducer is not None and i == len(mbs) - 1:
                        self._grad_reducer.arm()  # this backward finishes the gradients: reduce as they land
                    loss_cb(self._forward_local(mb, inputs), i).backward()
                else:
                    with torch.no_grad():
                        loss_cb(self._forward_local(mb, inputs), i)
        else:
            self._runner.run(mbs, loss_cb, train, inputs)

    def _finish_grads(self) -> None:
        params = dict(self.named_parameters())
        if not self.use_fsdp and self.dp > 1:  # replicated DP: sum over DP (sums commute with the TP sum below)
            if self._grad_reducer is not None:
                self._grad_reducer.finish()
            else:
                all_reduce_grads(list(params.values()), self.dims.dp_group, self._grad_bucket_bytes)
        if self._sp_params:  # norms saw only their sequence shard: sum over TP
            all_reduce_grads([params[n] for n in sorted(self._sp_params) if n in params], self.dims.tp_group)

    def _losses(self, microbatches, loss_fn, global_units_: float, train: bool) -> dict:
        mbs = [self._prepare(mb) for mb in microbatches]
        records: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        scale = 1.0 / float(global_units_)
        inputs = loss_inputs(loss_fn)

        def loss_cb(output, i):
            out = loss_fn(_wrap(output, inputs), mbs[i], tp_group=self._loss_tp_group)
            records[i] = (out.loss_sum.detach().float(), {k: v.detach().float() for k, v in out.metrics.items()})
            return out.loss_sum * scale

        self._run(mbs, loss_cb, train, inputs)
        if train:
            self._finish_grads()
        return self._reduce_records(records, loss_fn, global_units_)

    def _reduce_records(self, records, loss_fn, global_units_: float) -> dict:
        has_loss = self.dims.is_last_stage
        key = type(loss_fn)
        if key not in self._metric_names:
            names = sorted(next(iter(records.values()))[1]) if has_loss and records else None
            if self.pp > 1:
                obj = [names]
                dist.broadcast_object_list(obj, group=self.dims.pp_group, group_src=self.pp - 1)
                names = obj[0]
            self._metric_names[key] = names or []
        names = self._metric_names[key]
        vec = torch.zeros(1 + len(names), dtype=torch.float64)
        if has_loss and self.dims.tp_rank == 0:
            for loss_sum, metrics in records.values():
                vec[0] += float(loss_sum)
                for j, n in enumerate(names):
                    vec[1 + j] += float(metrics[n])
        if dist.is_initialized() and dist.get_world_size() > 1:
            vec = vec.to(self.device) if self.device.type != "cpu" else vec
            dist.all_reduce(vec)
            vec = vec.cpu()
        vec /= float(global_units_)
        return {"loss": float(vec[0]), "metrics": {n: float(vec[1 + j]) for j, n in enumerate(names)}}

    def forward_backward(self, microbatches: list[dict[str, torch.Tensor]], loss_fn, global_units: float) -> dict:
        """Forward and backward of this rank's micro-batches (PP schedule when pp > 1).

        Each micro-batch's ``loss_sum`` is divided by ``global_units`` before backward; gradients
        accumulate into ``.grad`` (zero them between steps) and are reduced over DP (sum) after the
        last micro-batch. Returns {"loss": global mean loss, "metrics": {name: global sum / units}}
        (identical on every rank).
        """
        self.train()
        return self._losses(microbatches, loss_fn, global_units, train=True)

    def forward_only(self, microbatches, loss_fn, global_units: float) -> dict:
        """Evaluation: same return value as ``forward_backward``, no gradients."""
        return self._losses(microbatches, loss_fn, global_units, train=False)

    def per_row(self, microbatches, row_fn, inputs: str = "logits") -> list[torch.Tensor]:
        """Forward only; ``row_fn(output, mb, tp_group) -> (rows,) tensor`` on the last stage for
        every micro-batch (e.g. summed completion log-probs for DPO references); ``output`` is what
        ``inputs`` names (see ``losses/base.py``): "logits" (this rank's vocabulary shard) or
        "label_log_probs" (a LabelLogProbs of the micro-batch's labels). Returns the per-row values,
        fp32 on CPU, on every rank of the pipeline."""
        mbs = [self._prepare(mb) for mb in microbatches]
        results: dict[int, torch.Tensor] = {}

        def cb(output, i):
            results[i] = row_fn(_wrap(output, inputs), mbs[i], self._loss_tp_group).detach().float()
            return output.new_zeros(())

        self._run(mbs, cb, train=False, inputs=inputs)
        out = [results.get(i, torch.zeros(mb["input_ids"].shape[0], device=self.device)) for i, mb in enumerate(mbs)]
        if self.pp > 1:
            flat = torch.cat(out).contiguous()
            if not self.dims.is_last_stage:
                flat.zero_()
            dist.all_reduce(flat, group=self.dims.pp_group)
            out = list(flat.split([mb["input_ids"].shape[0] for mb in mbs]))
        return [t.cpu() for t in out]

    def sequence_log_probs(self, microbatches) -> list[torch.Tensor]:
        """Per-row sum of log p(labels) * loss_mask (forward only), e.g. DPO reference log-probs."""
        def row_fn(logits, mb, tp_group):
            mask = mb.get("loss_mask")
            mask = (mb["labels"] >= 0).float() if mask is None else mask
            return sequence_log_probs(logits, mb["labels"], mask, tp_group)

        return self.per_row(microbatches, row_fn, inputs="label_log_probs")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip to ``max_norm`` (<= 0: only measure) by the true global norm; returns the norm before
        clipping, identical on every rank. Each element is counted once: TP-replicated parameters on
        TP rank 0 only, DP replicas (without FSDP) on DP rank 0 only."""
        counted = []
        for name, p in self.named_parameters():
            count = not (name in self._tp_replicated and self.dims.tp_rank > 0)
            count = count and (self.use_fsdp or self.dims.dp_rank == 0)
            counted.append((p, count))
        norm = float(global_grad_norm(counted, device=self.device))
        clip_grads_(self.parameters(), norm, max_norm)
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.model_parts:
            part.zero_grad(set_to_none=set_to_none)
