"""Typed configuration: model, parallelism, data, optimizer/schedule, stages and the recipe.

Every section is a dataclass. ``load_recipe(path, overrides)`` reads YAML, applies dotted
command-line overrides (``stages.pretrain.optim.lr=3e-4``) and validates everything before any
process group or model exists, so a bad value fails in a second with the field's full name and
the allowed values, not after minutes of start-up on a cluster.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_phi4 import registry


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _choice(value, name: str, allowed) -> None:
    _require(value in allowed, name, f"got {value!r}, allowed: {', '.join(map(repr, allowed))}")


def _registered(value, name: str, reg: "registry.Registry") -> None:
    """``value`` must be registered in ``reg`` (the allowed values grow as code registers more)."""
    _choice(value, name, reg.names())


_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(value: int | float | str, name: str = "value") -> int:
    """'10T' -> 10**13, '250B' -> 2.5e11, '5760' -> 5760; plain numbers pass through."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a count, got {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMBGT]?)\s*", str(value))
    if not m:
        raise ConfigError(f"{name}: cannot read {value!r} as a count (examples: 5760, 250B, 10T)")
    return int(round(float(m.group(1)) * _SUFFIX.get(m.group(2), 1)))


# --------------------------------------------------------------------------- model
# FP8 recipes per layer backend. local: torchao's float8 training (dynamic scaling from the current
# tensor: one scale per tensor, or per row with power-of-two scales). te: Transformer Engine's recipes
# (DelayedScaling, Float8CurrentScaling, Float8BlockScaling, MXFP8BlockScaling); which GPU each needs
# is checked when the backend is built (see docs/backends.md).
FP8_RECIPES: dict[str, tuple[str, ...]] = {
    "local": ("tensorwise", "rowwise"),
    "te": ("delayed", "tensorwise", "blockwise", "mxfp8"),
}
FP8_FORMATS = ("auto", "hybrid", "e4m3")  # te only: E4M3 everywhere, or E4M3 forward / E5M2 gradients
FP8_AMAX_REDUCTION = ("tp_dp", "tp")  # te: the group amaxes are reduced over (Megatron's default: TP x DP)


@dataclass
class FP8Config:
    """``model.fp8``: train the decoder layers' linear layers in FP8 (one switch for every backend).

    ``recipe``: how scales are chosen (allowed values depend on ``model.backend``: FP8_RECIPES).
    ``keep_first_last_bf16``: the first and the last ``bf16_layers`` decoder layers stay in the
    higher precision (their activations are the least regular); the embedding and the LM head never
    run in FP8. ``amax_history_len`` / ``amax_compute_algo``: delayed scaling only (te).
    ``amax_reduction``: te only, the group amaxes are all-reduced over ("tp_dp", Megatron's
    default, keeps every scale identical on all replicas; "tp" reduces only what sharding needs).
    ``format``: te only; "auto" is E4M3 forward / E5M2 gradients (HYBRID), E4M3 for mxfp8.
    """

    enabled: bool = False
    recipe: str = "tensorwise"
    keep_first_last_bf16: bool = False
    bf16_layers: int = 1  # layers kept in bf16 at each end when keep_first_last_bf16
    amax_history_len: int | None = None  # delayed only; None: 1024 (TE's default)
    amax_compute_algo: str | None = None  # delayed only: "max" | "most_recent"; None: "max"
    amax_reduction: str = "tp_dp"
    format: str = "auto"

    def validate(self, backend: str, num_layers: int, prefix: str = "model.fp8", check_available: bool = True) -> None:
        _choice(self.amax_reduction, f"{prefix}.amax_reduction", FP8_AMAX_REDUCTION)
        _choice(self.format, f"{prefix}.format", FP8_FORMATS)
        _require(self.bf16_layers >= 1, f"{prefix}.bf16_layers", f"must be >= 1, got {self.bf16_layers}")
        if self.amax_compute_algo is not None:
            _choice(self.amax_compute_algo, f"{prefix}.amax_compute_algo", ("max", "most_recent"))
        if self.amax_history_len is not None:
            _require(self.amax_history_len >= 1, f"{prefix}.amax_history_len",
                     f"must be >= 1, got {self.amax_history_len}")
        if not self.enabled:
            return
        allowed = FP8_RECIPES.get(backend)
        _require(allowed is not None, f"{prefix}.enabled",
                 f"model.backend {backend!r} has no FP8 path; FP8 works with: {', '.join(FP8_RECIPES)}")
        if self.recipe not in allowed:
            others = [b for b, r in FP8_RECIPES.items() if self.recipe in r]
            hint = f" ({self.recipe!r} needs model.backend {' or '.join(map(repr, others))})" if others else ""
            raise ConfigError(f"{prefix}.recipe: got {self.recipe!r} with model.backend {backend!r}, allowed: "
                              f"{', '.join(map(repr, allowed))}{hint}")
        if self.recipe != "delayed":
            for f in ("amax_history_len", "amax_compute_algo"):
                _require(getattr(self, f) is None, f"{prefix}.{f}",
                         f"only delayed scaling keeps an amax history; recipe {self.recipe!r} scales from the "
                         f"current tensor (remove the field)")
        if backend == "local":
            _require(self.format == "auto", f"{prefix}.format",
                     "the local backend takes its formats from torchao's recipe (tensorwise: E4M3 forward, E5M2 "
                     "gradients; rowwise: E4M3); 'format' applies to model.backend 'te' only")
            _require(self.amax_reduction == "tp_dp", f"{prefix}.amax_reduction",
                     "the local backend scales from the current tensor and reduces amaxes over the "
                     "tensor-parallel group exactly where a tensor is sharded; 'amax_reduction' applies to "
                     "model.backend 'te' only")
        if self.recipe == "mxfp8":
            _require(self.format in ("auto", "e4m3"), f"{prefix}.format", "MXFP8 block scaling uses E4M3 only")
        if self.keep_first_last_bf16:
            # Megatron refuses this too: per-layer autocast regions break delayed scaling's amax reduction.
            _require(self.recipe != "delayed", f"{prefix}.keep_first_last_bf16",
                     "delayed scaling reduces amaxes when its one autocast region exits; layers kept in "
                     "bf16 need per-layer regions. Use recipe 'tensorwise' (or 'mxfp8'/'blockwise')")
            _require(2 * self.bf16_layers < num_layers, f"{prefix}.bf16_layers",
                     f"{self.bf16_layers} layers at each end leave no FP8 layer in a {num_layers}-layer model")
        if backend == "local" and check_available:
            reason = registry.module_requirement("torchao", "pip install torchao (a version matching your torch)")()
            _require(reason is None, f"{prefix}.enabled", f"FP8 on the local backend uses torchao: {reason}")

    def bf16_layer(self, layer_idx: int, num_layers: int) -> bool:
        """Whether decoder layer ``layer_idx`` stays in bf16 (FP8 off, or one of the kept end layers)."""
        if not self.enabled:
            return True
        n = self.bf16_layers if self.keep_first_last_bf16 else 0
        return layer_idx < n or layer_idx >= num_layers - n


@dataclass
class ModelConfig:
    vocab_size: int = 100352
    hidden_size: int = 5120
    num_layers: int = 40
    num_attention_heads: int = 40
    num_kv_heads: int = 10
    intermediate_size: int = 17920
    norm_eps: float = 1e-5
    rope_theta: float = 250000.0
    # Tokens per chunk when the training losses apply the LM head (fused with the log-softmax): one
    # chunk's fp32 logits (chunk x vocab / tp x 4 bytes; 411 MB at 1024 x 100352) is all they hold.
    logits_chunk_tokens: int = 1024
    max_seq_length: int = 16384
    init_std: float = 0.02
    arch: str = "phi4"  # model spec (megatron_phi4.registry.MODELS): layers, pipeline split, checkpoint names
    # Which layer classes build the model (megatron_phi4.registry.BACKENDS): "local" = plain PyTorch,
    # "te" = Transformer Engine (NGC containers). Checkpoint names do not depend on it.
    backend: str = "local"
    fp8: FP8Config = field(default_factory=FP8Config)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, prefix: str = "model", check_available: bool = True) -> None:
        """``check_available``: also require the backend's libraries on this machine (False when
        reading a checkpoint's config, which may have been trained on another backend)."""
        for f in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                  "intermediate_size", "max_seq_length"):
            _require(getattr(self, f) > 0, f"{prefix}.{f}", f"must be positive, got {getattr(self, f)}")
        _require(self.hidden_size % self.num_attention_heads == 0, f"{prefix}.hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        _require(self.head_dim % 2 == 0, f"{prefix}.hidden_size", "head_dim must be even for RoPE")
        _require(self.num_attention_heads % self.num_kv_heads == 0, f"{prefix}.num_kv_heads",
                 f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                 f"num_kv_heads={self.num_kv_heads}")
        _require(self.rope_theta > 0, f"{prefix}.rope_theta", "must be positive")
        _require(self.norm_eps > 0, f"{prefix}.norm_eps", "must be positive")
        _require(self.logits_chunk_tokens > 0, f"{prefix}.logits_chunk_tokens",
                 f"must be positive, got {self.logits_chunk_tokens}")
        _registered(self.arch, f"{prefix}.arch", registry.MODELS)
        _registered(self.backend, f"{prefix}.backend", registry.BACKENDS)
        if check_available:
            reason = registry.BACKENDS.unavailable_reason(self.backend)
            _require(reason is None, f"{prefix}.backend", f"{self.backend!r} cannot be used here: {reason}")
        if self.fp8.enabled:
            # FP8 GEMMs (cuBLASLt, torch._scaled_mm, TE) need the inner and outer sizes to be multiples of 16.
            for what, n in (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size),
                            ("num_kv_heads * head_dim", self.num_kv_heads * self.head_dim)):
                _require(n % 16 == 0, f"{prefix}.fp8.enabled", f"FP8 matrix products need {what} = {n} to be a "
                                                               f"multiple of 16")
        self.fp8.validate(self.backend, self.num_layers, f"{prefix}.fp8", check_available)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # microsoft/phi-4 as released (after mid-training: 16K context, RoPE base 250K).
    "phi4-14b": {},
    # Tiny models for tests and CPU demos; same shape rules (GQA 2:1, SwiGLU, untied head).
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                 intermediate_size=128, max_seq_length=256, rope_theta=10000.0),
    # Tiny body with the real Phi-4 vocabulary, for end-to-end runs on tokenized text.
    "tiny-phi4-vocab": dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                            intermediate_size=192, max_seq_length=1024, rope_theta=10000.0),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}, allowed: {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


# --------------------------------------------------------------------------- parallelism
@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = -1  # -1: whatever is left of the world size
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    # Layers per pipeline stage (pp * virtual_stages entries); None splits evenly, charging the
    # embedding and the head as `pp_embedding_cost` / `pp_head_cost` layers each.
    pp_layers_per_stage: list[int] | None = None
    pp_embedding_cost: float = 0.0
    pp_head_cost: float = 0.0
    dp_shard: str = "fsdp"  # "fsdp": params/grads/optimizer sharded over DP; "none": replicated
    recompute: str = "none"
    backend: str = "auto"  # auto -> nccl on CUDA, gloo on CPU
    mixed_precision: str = "auto"  # auto -> bf16 compute with fp32 master weights on GPU, fp32 on CPU
    timeout_minutes: float = 10.0
    # torch.compile each decoder block (names and checkpoints unchanged). "inductor" generates fused
    # kernels; "aot_eager" traces the same graphs without code generation (debugging, CPU tests).
    compile: bool = False
    compile_backend: str = "inductor"
    # dp_shard none: all-reduce gradient buckets while backward still runs (Megatron's
    # --overlap-grad-reduce); false: one bucketed all-reduce after the last micro-batch.
    overlap_grad_reduce: bool = True

    def validate(self, model: ModelConfig | None = None, world_size: int | None = None,
                 prefix: str = "parallel") -> None:
        for f in ("tp", "pp", "virtual_stages"):
            _require(getattr(self, f) >= 1, f"{prefix}.{f}", f"must be >= 1, got {getattr(self, f)}")
        _require(self.dp == -1 or self.dp >= 1, f"{prefix}.dp", f"must be >= 1 or -1 (infer), got {self.dp}")
        _registered(self.pp_schedule, f"{prefix}.pp_schedule", registry.PIPELINE_SCHEDULES)
        _choice(self.dp_shard, f"{prefix}.dp_shard", ("fsdp", "none"))
        _choice(self.recompute, f"{prefix}.recompute", ("none", "selective", "full"))
        _choice(self.backend, f"{prefix}.backend", ("auto", "gloo", "nccl"))
        _choice(self.mixed_precision, f"{prefix}.mixed_precision", ("auto", "bf16", "fp32"))
        _choice(self.compile_backend, f"{prefix}.compile_backend", ("inductor", "aot_eager", "eager"))
        _require(self.virtual_stages == 1 or self.pp_schedule in ("interleaved_1f1b", "zero_bubble"),
                 f"{prefix}.virtual_stages",
                 f"{self.virtual_stages} model chunks per rank need pp_schedule 'interleaved_1f1b' or "
                 f"'zero_bubble', not {self.pp_schedule!r}")
        _require(self.pp_schedule != "interleaved_1f1b" or self.virtual_stages >= 2,
                 f"{prefix}.virtual_stages", "interleaved_1f1b needs virtual_stages >= 2")
        _require(not self.sequence_parallel or self.tp > 1, f"{prefix}.sequence_parallel",
                 "sequence parallelism shards activations over the TP group and needs tp > 1")
        _require(not (self.pp_schedule == "zero_bubble" and self.pp > 1 and self.dp_shard == "fsdp"),
                 f"{prefix}.pp_schedule",
                 "'zero_bubble' computes weight gradients in a separate pass over the autograd graph, which "
                 "FSDP2's sharded parameters are not part of; use dp_shard 'none' or 'interleaved_1f1b'")
        if model is not None:
            for heads, what in ((model.num_attention_heads, "num_attention_heads"),
                                (model.num_kv_heads, "num_kv_heads")):
                if heads % self.tp:
                    fits = [d for d in range(1, model.num_kv_heads + 1)
                            if model.num_attention_heads % d == 0 and model.num_kv_heads % d == 0]
                    raise ConfigError(
                        f"{prefix}.tp: tensor-parallel size {self.tp} does not divide model.{what}={heads}; "
                        f"each TP rank must own whole query groups ({model.num_attention_heads} query heads, "
                        f"{model.num_kv_heads} KV heads), so tp must be one of {fits}")
            stages = self.pp * self.virtual_stages
            if self.pp_layers_per_stage is not None:
                _require(len(self.pp_layers_per_stage) == stages, f"{prefix}.pp_layers_per_stage",
                         f"needs pp * virtual_stages = {stages} entries, got {len(self.pp_layers_per_stage)}")
                _require(all(n >= 1 for n in self.pp_layers_per_stage), f"{prefix}.pp_layers_per_stage",
                         "every stage needs at least one layer")
                _require(sum(self.pp_layers_per_stage) == model.num_layers, f"{prefix}.pp_layers_per_stage",
                         f"sums to {sum(self.pp_layers_per_stage)}, the model has {model.num_layers} layers")
            else:
                _require(model.num_layers >= stages, f"{prefix}.pp",
                         f"pp * virtual_stages = {stages} stages but the model has only {model.num_layers} layers")
        if world_size is not None:
            model_parallel = self.tp * self.pp
            _require(world_size % model_parallel == 0, f"{prefix}",
                     f"world size {world_size} is not divisible by tp * pp = {model_parallel}")
            if self.dp != -1:
                _require(self.tp * self.pp * self.dp == world_size, f"{prefix}",
                         f"tp * pp * dp = {self.tp}*{self.pp}*{self.dp} = {self.tp * self.pp * self.dp} "
                         f"!= world size {world_size}")

    def resolved_dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp) if self.dp == -1 else self.dp


# --------------------------------------------------------------------------- data, optimizer, loss
@dataclass
class DataConfig:
    # pretrain: a mixture spec of indexed datasets; sft: chat binaries from preprocess_chat;
    # preference: pair records; synthetic: random tokens (smoke tests, benchmarks).
    kind: str = "pretrain"
    mixture: str | None = None  # YAML mixture spec (pretrain)
    paths: list[str] = field(default_factory=list)  # dataset prefixes / files (sft, preference)
    validation: str | None = None  # held-out mixture spec, or prefix/file of the same kind
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # Optional ramp [start, increment, ramp_samples] (Megatron's --rampup-batch-size).
    batch_size_ramp: list[int] | None = None
    min_document_tokens: int = 0  # long-document filter (mid-training: 8192)
    seed: int = 1234
    cache_dir: str | None = None
    num_workers: int = 0
    # Token ids the data uses for padding and end of document; None: Phi-4's (<|dummy_85|> 100349,
    # <|endoftext|> 100257). A model on a renumbered vocabulary (the CPU demo's trimmed one) sets its own.
    pad_id: int | None = None
    eod_id: int | None = None

    def validate(self, prefix: str = "data") -> None:
        _registered(self.kind, f"{prefix}.kind", registry.DATA_KINDS)
        _require(self.seq_length > 0, f"{prefix}.seq_length", "must be positive")
        _require(self.micro_batch_size > 0, f"{prefix}.micro_batch_size", "must be positive")
        _require(self.global_batch_size > 0, f"{prefix}.global_batch_size", "must be positive")
        _require(self.global_batch_size % self.micro_batch_size == 0, f"{prefix}.global_batch_size",
                 f"{self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        if self.kind == "pretrain":
            _require(self.mixture is not None, f"{prefix}.mixture", "a pretrain stage needs a mixture spec")
        if self.kind in ("sft", "preference"):
            _require(bool(self.paths), f"{prefix}.paths", f"a {self.kind} stage needs at least one path")
        for f in ("pad_id", "eod_id"):
            v = getattr(self, f)
            _require(v is None or v >= 0, f"{prefix}.{f}", f"must be a token id >= 0 (or unset), got {v}")
        if self.batch_size_ramp is not None:
            _require(len(self.batch_size_ramp) == 3, f"{prefix}.batch_size_ramp",
                     "expected [start, increment, ramp_samples]")

    def check_batch_layout(self, dp: int, prefix: str = "data") -> None:
        per_step = self.micro_batch_size * dp
        _require(self.global_batch_size % per_step == 0, f"{prefix}.global_batch_size",
                 f"{self.global_batch_size} is not divisible by micro_batch_size * dp = "
                 f"{self.micro_batch_size} * {dp}")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    decay_style: str = "cosine"
    decay_steps: int | None = None  # None: the rest of the stage after warm-up
    impl: str = "torch"  # torch AdamW (fused=True on CUDA)

    def validate(self, prefix: str = "optim") -> None:
        _require(self.lr > 0, f"{prefix}.lr", "must be positive")
        _require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", f"must be within [0, lr={self.lr}]")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{prefix}.beta1/beta2", "must be in [0, 1)")
        _require(self.clip_grad >= 0, f"{prefix}.clip_grad", "must be >= 0 (0 disables)")
        _require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        _choice(self.decay_style, f"{prefix}.decay_style", ("cosine", "linear", "constant"))
        # apex's FusedAdam keeps its step count per parameter group, outside the state this project
        # checkpoints, so a resumed run would restart Adam's bias correction: refused rather than
        # silently different. torch's fused AdamW (used on CUDA) is the same fused kernel family.
        _require(self.impl == "torch", f"{prefix}.impl",
                 f"got {self.impl!r}; only 'torch' (AdamW, fused on CUDA) is allowed: apex FusedAdam's step count "
                 f"is not checkpointed, so a resumed run would differ from an uninterrupted one")


@dataclass
class LossConfig:
    """The stage's loss. DPO objectives use TRL's names (megatron_phi4/losses/dpo_objectives.py,
    docs/posttraining.md); the rules below mirror that module's ``check_dpo_options`` (config
    imports nothing from the loss layer; tests/test_dpo_losses.py checks the two agree)."""

    type: str = "lm"  # lm (masked next-token CE) | dpo
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"  # TRL's DPOConfig.loss_type names, plus cdpo (smoothed sigmoid)
    dpo_label_smoothing: float = 0.0  # robust, exo_pair (needs > 0), aot, aot_unpaired, cdpo only
    dpo_discopop_tau: float = 0.05  # discopop's temperature (TRL's default)
    # > 0 adds TRL's "sft" loss type with this weight: NLL of the chosen completions (RPO / MPO)
    dpo_sft_weight: float = 0.0
    # Where the reference log-probs come from: "model" (a frozen copy of the stage's initial weights
    # runs beside the policy) or "precomputed" (tools/precompute_ref_logprobs.py wrote them beside the
    # preference data; checked against the stage's initial checkpoint by its fingerprint).
    dpo_reference: str = "model"

    DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "cdpo")
    DPO_LABEL_SMOOTHING_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired", "cdpo")

    def validate(self, prefix: str = "loss") -> None:
        _registered(self.type, f"{prefix}.type", registry.LOSSES)
        _require(self.dpo_beta > 0, f"{prefix}.dpo_beta", "must be positive")
        _choice(self.dpo_loss_type, f"{prefix}.dpo_loss_type", self.DPO_LOSS_TYPES)
        _require(0 <= self.dpo_label_smoothing < 0.5, f"{prefix}.dpo_label_smoothing", "must be in [0, 0.5)")
        _require(self.dpo_label_smoothing == 0 or self.dpo_loss_type in self.DPO_LABEL_SMOOTHING_TYPES,
                 f"{prefix}.dpo_label_smoothing",
                 f"dpo_loss_type {self.dpo_loss_type!r} does not use label smoothing (only "
                 f"{', '.join(self.DPO_LABEL_SMOOTHING_TYPES)} do; 'cdpo' is sigmoid with conservative smoothing)")
        _require(self.dpo_loss_type != "exo_pair" or self.dpo_label_smoothing > 0,
                 f"{prefix}.dpo_label_smoothing", "dpo_loss_type 'exo_pair' needs label smoothing > 0 (e.g. 1e-3)")
        _require(self.dpo_discopop_tau > 0, f"{prefix}.dpo_discopop_tau", "must be positive")
        _require(0 <= self.dpo_sft_weight < float("inf"), f"{prefix}.dpo_sft_weight", "must be a finite number >= 0")
        _choice(self.dpo_reference, f"{prefix}.dpo_reference", ("model", "precomputed"))


# --------------------------------------------------------------------------- callbacks
@dataclass
class CallbackConfig:
    """One trainer callback: a built-in (nonfinite, metrics, evaluation, stop_signal, checkpoint), a
    name registered in ``megatron_phi4.registry.CALLBACKS``, or ``"module:Class"``. Every other key
    of the entry is passed to the callback's constructor (``options``)."""

    type: str = ""
    enabled: bool = True
    options: dict = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        _require(bool(self.type), f"{prefix}.type", "names the callback (e.g. evaluation, or my.module:MyCallback)")
        _require(self.type in registry.CALLBACKS or ":" in self.type, f"{prefix}.type",
                 f"got {self.type!r}; allowed: {', '.join(map(repr, registry.CALLBACKS.names()))} or "
                 f"'module:Class'")


# --------------------------------------------------------------------------- stages and recipe
@dataclass
class StageConfig:
    name: str = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train_tokens: int | str | None = None  # budget in tokens ("10T"), or
    train_steps: int | None = None  # ... in optimizer steps
    rope_theta: float | None = None  # None keeps the model's
    init_from: str = "previous"  # "previous" stage's final weights, "none", or a checkpoint path
    reset_optimizer: bool = True
    eval_interval: int = 0  # steps; 0 disables validation
    eval_iters: int = 1
    callbacks: list[CallbackConfig] = field(default_factory=list)  # active only during this stage

    def validate(self, prefix: str) -> None:
        _require(bool(re.fullmatch(r"[A-Za-z0-9_\-]+", self.name)), f"{prefix}.name",
                 f"{self.name!r} must be letters, digits, '-' or '_' (it names checkpoint folders)")
        _require((self.train_tokens is None) != (self.train_steps is None), prefix,
                 "set exactly one of train_tokens and train_steps")
        if self.train_tokens is not None:
            self.train_tokens = parse_count(self.train_tokens, f"{prefix}.train_tokens")
            _require(self.train_tokens > 0, f"{prefix}.train_tokens", "must be positive")
        if self.train_steps is not None:
            _require(self.train_steps > 0, f"{prefix}.train_steps", "must be positive")
        self.data.validate(f"{prefix}.data")
        self.optim.validate(f"{prefix}.optim")
        self.loss.validate(f"{prefix}.loss")
        for i, cb in enumerate(self.callbacks):
            cb.validate(f"{prefix}.callbacks.{i}")
        if self.loss.type == "dpo":
            _require(self.data.kind in ("preference", "synthetic"), f"{prefix}.data.kind",
                     f"a DPO loss needs preference data, got {self.data.kind!r}")
            _require(self.loss.dpo_reference == "model" or self.data.kind == "preference",
                     f"{prefix}.loss.dpo_reference", "'precomputed' needs preference data files (their sidecars)")

    def num_steps(self) -> int:
        if self.train_steps is not None:
            return self.train_steps
        tokens_per_step = self.data.global_batch_size * self.data.seq_length
        return max(1, -(-int(self.train_tokens) // tokens_per_step))


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <run_dir>/checkpoints
    interval: int = 0  # steps between saves; 0: only at stage ends and on signals
    keep_last: int = 2
    async_save: bool = False
    load: str = "auto"  # auto: resume from `latest` if present; "none"; or a checkpoint path

    def validate(self, prefix: str = "checkpoint") -> None:
        _require(self.interval >= 0, f"{prefix}.interval", "must be >= 0 (0: only at stage ends and on signals)")
        _require(self.keep_last >= 1, f"{prefix}.keep_last", "must be >= 1")
        # save_sharded(async_=True) exists; the trainer does not yet overlap a save with training
        # steps (it must wait for the write before moving `latest`), so refuse rather than ignore it.
        _require(not self.async_save, f"{prefix}.async_save",
                 "asynchronous checkpointing is not wired into the trainer yet; use false")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard: bool = True
    metrics_jsonl: bool = True
    # Peak dense bf16 TFLOP/s per device for MFU (H100 SXM: 989); 0 disables MFU.
    peak_tflops: float = 0.0


@dataclass
class RecipeConfig:
    name: str = "run"
    run_dir: str = "runs/default"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stages: list[StageConfig] = field(default_factory=list)
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops
    # Trainer callbacks in dispatch order; built-ins not listed run after these in their default order
    # (nonfinite, metrics, evaluation, stop_signal, checkpoint); `{type: X, enabled: false}` removes one.
    callbacks: list[CallbackConfig] = field(default_factory=list)

    def validate(self, world_size: int | None = None, stage_name: str | None = None) -> "RecipeConfig":
        """Check every field; with ``world_size``, also that each stage's global batch splits over
        the data-parallel ranks -- only ``stage_name``'s when the run trains that stage alone (stages of
        one recipe may run on differently sized jobs: pre-training on 240 nodes, SFT on 16)."""
        self.model.validate("model")
        self.parallel.validate(self.model, world_size, "parallel")
        self.checkpoint.validate("checkpoint")
        for i, cb in enumerate(self.callbacks):
            cb.validate(f"callbacks.{i}")
        _require(bool(self.stages), "stages", "a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        _require(len(set(names)) == len(names), "stages", f"stage names must be unique, got {names}")
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages.{stage.name}")
            _require(stage.data.seq_length <= self.model.max_seq_length, f"stages.{stage.name}.data.seq_length",
                     f"{stage.data.seq_length} exceeds model.max_seq_length={self.model.max_seq_length} (the longest "
                     f"sequence the model is configured for); raise model.max_seq_length or shorten the stage")
            for f in ("pad_id", "eod_id"):
                v = getattr(stage.data, f)
                _require(v is None or v < self.model.vocab_size, f"stages.{stage.name}.data.{f}",
                         f"token id {v} is outside the model's vocabulary [0, {self.model.vocab_size})")
            if world_size is not None and stage_name in (None, stage.name):
                stage.data.check_batch_layout(self.parallel.resolved_dp(world_size), f"stages.{stage.name}.data")
        return self

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"--stage: no stage named {name!r}; the recipe has {[s.name for s in self.stages]}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- YAML and overrides
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, hint, name: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, name)
    if origin is list:
        _require(isinstance(value, list), name, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}.{i}") for i, v in enumerate(value)] if args else value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name,
                 f"expected a number, got {value!r}")
        return float(value)
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        _require(isinstance(value, bool), name, f"expected true/false, got {value!r}")
        return value
    if hint is str:
        _require(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict | None, name: str = ""):
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys by their full name."""
    data = {} if data is None else data
    if dataclasses.is_dataclass(data):
        return data
    _require(isinstance(data, dict), name or cls.__name__, f"expected a mapping, got {data!r}")
    data = dict(data)
    if cls is ModelConfig and "preset" in data:
        base = model_preset(data.pop("preset"))
        data = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **data}
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if cls is CallbackConfig:  # every key but type/enabled is an option of the callback
        options = {k: data.pop(k) for k in list(data) if k not in fields}
        data["options"] = {**dict(data.get("options") or {}), **options}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{name}." if name else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field; allowed: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{name}.{k}" if name else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            idx = _list_index(node, key, ".".join(keys[: i + 1]))
        elif isinstance(node, dict):
            idx = key
            if not last and not isinstance(node.get(key), (dict, list)):
                node[key] = {}  # create missing (or empty) sections on the way down
        else:
            raise ConfigError(f"{dotted}: {'.'.join(keys[:i])} is a value, not a section")
        if last:
            node[idx] = value
        else:
            node = node[idx]


def _list_index(items: list, key: str, dotted: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise ConfigError(f"{dotted}: no list entry with index or name {key!r}")


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw config tree.

    List entries are addressed by index or by their ``name`` (``stages.sft.optim.lr=1e-6``).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (for example train.lr=3e-4)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return tree


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_variables(tree, variables: dict | None = None):
    """Replace ``${NAME}`` in every string of a raw config tree by ``variables[NAME]``, else the
    environment variable ``NAME``; an unknown name is a ConfigError."""
    import os

    variables = dict(variables or {})

    def sub(m):
        name = m.group(1)
        if name in variables:
            return str(variables[name])
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(f"${{{name}}}: unknown variable (set it in the environment)")

    if isinstance(tree, dict):
        return {k: expand_variables(v, variables) for k, v in tree.items()}
    if isinstance(tree, list):
        return [expand_variables(v, variables) for v in tree]
    if isinstance(tree, str):
        return _VAR.sub(sub, tree)
    return tree


def load_recipe(path: str | Path | None, overrides: list[str] = (), world_size: int | None = None,
                variables: dict | None = None, stage_name: str | None = None) -> RecipeConfig:
    """Read, expand ``${NAME}`` variables (see ``expand_variables``), override and validate (the
    batch layout for ``world_size``: of every stage, or of ``stage_name`` alone when only that
    stage will run)."""
    tree = load_yaml(path) if path is not None else {}
    apply_overrides(tree, list(overrides))
    tree = expand_variables(tree, variables)
    try:
        recipe = from_dict(RecipeConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return recipe.validate(world_size, stage_name)
