"""The ``te`` backend: NVIDIA Transformer Engine's fused layers behind the layer-backend seam.

Which TE module serves which piece (TE >= 2.x, ``transformer_engine.pytorch``):

==================  ======================================================  ==========================
piece               TE module                                               its parameters
==================  ======================================================  ==========================
``norm_linear``     ``LayerNormLinear(normalization="RMSNorm")``: the       ``layer_norm_weight``,
                    input norm fused into one QKV product, column-parallel  ``weight`` = [q; k; v] rows
``norm_mlp``        ``LayerNormMLP(normalization="RMSNorm",                 ``layer_norm_weight``,
                    activation="swiglu")``: fc1 column-, fc2 row-parallel   ``fc1_weight`` = [gate; up],
                                                                            ``fc2_weight``
``linear`` (row)    ``Linear(parallel_mode="row")`` (the output projection)  ``weight``
``core_attention``  ``DotProductAttention`` (GQA via ``num_gqa_groups``;    none
                    packed documents as "thd" + ``cu_seqlens``)
``norm``            ``RMSNorm`` (the final norm)                            ``weight``
``embedding``,      the local vocabulary-parallel ones: TE has no           ``weight``
``lm_head``         embedding, and the head's logits feed the               
                    vocabulary-parallel loss, which reads this rank's
                    vocabulary shard and never the gathered logits;
                    both also stay out of FP8 (as in Megatron).
==================  ======================================================  ==========================

Facts read from TE's source (NVIDIA/TransformerEngine, ``transformer_engine/pytorch/``):

* ``module/layernorm_mlp.py`` (``LayerNormMLP.__init__``): for gated activations ``fc1_weight``
  is ``(2 * ffn / tp, hidden)``; the activation splits fc1's output in two along the features and
  gates the FIRST half: ``"swiglu": silu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1]``
  (``LayerNormMLP.onnx_forward``'s reference table; ``ops/basic/swiglu.py``: "Transformer Engine
  applies the gating function to the first half"). So each rank's fc1 rows are [gate_r; up_r]:
  this rank's gate rows, then its up rows -- not a TP slice of one global [gate; up] tensor.
* ``LayerNormMLP`` takes ``set_parallel_mode`` (not ``parallel_mode``); ``LayerNormLinear`` and
  ``Linear`` take ``parallel_mode`` ("column"/"row"). All default to ``bias=True`` and
  ``normalization="LayerNorm"``, so both are set here.
* ``zero_centered_gamma`` defaults to False in ``LayerNormLinear``, ``LayerNormMLP`` and ``RMSNorm``
  (the weight multiplies the normalized input and is initialized to one): the same convention as
  our checkpoints, so the norm weights map one to one. It is passed explicitly as False.
* Sequence parallelism in TE gathers and scatters along the FIRST dimension (TE, like Megatron,
  runs in "sbhd" order). Our activations are batch-first, so under SP the pieces present
  ``(seq, batch, hidden)`` views to TE (free when batch is 1) and turn the result back.
* ``DotProductAttention(num_attention_heads, kv_channels, num_gqa_groups, ..., tp_size,
  tp_group)`` takes global head counts and divides by the TP size; "thd" needs
  ``attn_mask_type="padding_causal"`` and ``cu_seqlens_q/kv``.

Parameter names and layouts are declared by the pure functions ``*_param_shapes`` /
``*_layout`` below, which import nothing from TE: tests check the mapping on machines without it
(tests/layers/test_te_mapping.py), and the TE classes call the same functions.

FP8 (``model.fp8``): ``autocast()`` opens TE's autocast region (``te.autocast``, or
``te.fp8_autocast`` before TE 2.8) with the recipe and the amax reduction group
(``ParallelContext.amax_group``, TP x DP by default) around the model's decoder layers; layers kept
in bf16 disable it around their own pieces. FP8 copies of the weights are cached across the
micro-batches of a step: TE's ``is_first_microbatch`` is derived from the weights' version
counters (``WeightVersions``), which every in-place update (optimizer step, checkpoint load, FSDP
all-gather) advances, so the engine and the pipeline schedules need no extra signal.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from megatron_phi4.distributed.sharding import Layout, stacked, whole
from megatron_phi4.layers.backend import AttentionMetadata, ParallelContext


# --------------------------------------------------------------------------- layouts (no TE needed)
def _local(width: int, ctx: ParallelContext, what: str) -> int:
    if width % ctx.tp_size:
        raise ValueError(f"{what}: {width} is not divisible by the tensor-parallel size {ctx.tp_size}")
    return width // ctx.tp_size


def norm_linear_param_shapes(hidden: int, outputs: dict[str, int], ctx: ParallelContext) -> dict[str, tuple]:
    """``LayerNormLinear(hidden, sum(outputs), parallel_mode="column", normalization="RMSNorm",
    bias=False)``: ``layer_norm_weight`` (hidden,), ``weight`` (sum(outputs) / tp, hidden)."""
    rows = sum(_local(w, ctx, f"norm_linear {n}") for n, w in outputs.items())
    return {"layer_norm_weight": (hidden,), "weight": (rows, hidden)}


def norm_linear_layout(hidden: int, outputs: dict[str, int], ctx: ParallelContext) -> Layout:
    """The fused ``weight`` stacks this rank's rows of each output (q, k, v) in order."""
    local = [_local(w, ctx, f"norm_linear {n}") for n, w in outputs.items()]
    pieces = [(n, (w, hidden), loc) for (n, w), loc in zip(outputs.items(), local)]
    return {"layer_norm_weight": [whole("norm", (hidden,), sp_grad=ctx.sequence_parallel)],
            "weight": stacked(pieces, tp_offsets=[ctx.tp_rank * loc for loc in local])}


def norm_mlp_param_shapes(hidden: int, ffn: int, ctx: ParallelContext) -> dict[str, tuple]:
    """``LayerNormMLP(hidden, ffn, activation="swiglu", bias=False)``: fc1 holds gate and up."""
    local = _local(ffn, ctx, "norm_mlp ffn")
    return {"layer_norm_weight": (hidden,), "fc1_weight": (2 * local, hidden), "fc2_weight": (hidden, local)}


def norm_mlp_layout(hidden: int, ffn: int, ctx: ParallelContext) -> Layout:
    """fc1 = [this rank's gate rows; this rank's up rows] (TE gates the first half, see above);
    fc2 = this rank's columns of down_proj."""
    local = _local(ffn, ctx, "norm_mlp ffn")
    off = ctx.tp_rank * local
    fc1 = [("gate_proj", (ffn, hidden), local), ("up_proj", (ffn, hidden), local)]
    return {"layer_norm_weight": [whole("norm", (hidden,), sp_grad=ctx.sequence_parallel)],
            "fc1_weight": stacked(fc1, tp_offsets=[off, off]),
            "fc2_weight": [whole("down_proj", (hidden, ffn), tp_dim=1, tp_offset=off)]}


def row_linear_param_shapes(in_features: int, out_features: int, ctx: ParallelContext) -> dict[str, tuple]:
    """``Linear(in, out, parallel_mode="row", bias=False)``: ``weight`` (out, in / tp)."""
    return {"weight": (out_features, _local(in_features, ctx, "linear in_features"))}


def row_linear_layout(in_features: int, out_features: int, ctx: ParallelContext) -> Layout:
    local = _local(in_features, ctx, "linear in_features")
    return {"weight": [whole("weight", (out_features, in_features), tp_dim=1, tp_offset=ctx.tp_rank * local)]}


def rmsnorm_param_shapes(hidden: int, ctx: ParallelContext) -> dict[str, tuple]:
    return {"weight": (hidden,)}


def rmsnorm_layout(hidden: int, ctx: ParallelContext) -> Layout:
    return {"weight": [whole("weight", (hidden,), sp_grad=ctx.sequence_parallel)]}


# --------------------------------------------------------------------------- packed documents
def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened ``(batch * seq)`` tokens (int32, starting
    at 0) and the longest document: TE's "thd" description of a packed batch. A document ends
    where the id changes or the row ends (ids are contiguous runs, as the packer writes them)."""
    b, s = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    cu = torch.cat([idx, idx.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# --------------------------------------------------------------------------- FP8 weight caching
class WeightVersions:
    """``is_first_microbatch`` for TE from the weights' identity and version counters.

    TE caches its FP8 copy of a weight when told ``is_first_microbatch=True`` and reuses it while
    told False. The weights change only by in-place updates (optimizer steps, loads, FSDP's
    all-gather into the unsharded parameter), each of which advances ``tensor._version``, or by
    swapping the storage; either makes the next forward a "first micro-batch" again."""

    def __init__(self):
        self._seen = None

    def is_first_microbatch(self, params) -> bool:
        now = tuple((p.data_ptr(), p._version) for p in params)
        first = now != self._seen
        self._seen = now
        return first


# --------------------------------------------------------------------------- TE (imported lazily)
def _te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:  # config validation normally catches this first
        raise ImportError("model.backend 'te' needs Transformer Engine (transformer_engine), which ships in "
                          "NVIDIA's NGC PyTorch containers") from e
    return te


def te_autocast(enabled: bool, recipe=None, group=None):
    """TE's FP8 region: ``te.autocast`` (TE >= 2.8) or the older ``te.fp8_autocast``."""
    te = _te()
    if hasattr(te, "autocast"):
        return te.autocast(enabled=enabled, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe, fp8_group=group)


def te_recipe(fp8):
    """The TE recipe object for ``model.fp8`` (see config.FP8_RECIPES)."""
    from transformer_engine.common import recipe as r

    fmt = {"auto": None, "hybrid": r.Format.HYBRID, "e4m3": r.Format.E4M3}[fp8.format]
    if fp8.recipe == "delayed":
        return r.DelayedScaling(fp8_format=fmt or r.Format.HYBRID, amax_history_len=fp8.amax_history_len or 1024,
                                amax_compute_algo=fp8.amax_compute_algo or "max")
    if fp8.recipe == "tensorwise":
        return r.Float8CurrentScaling(fp8_format=fmt or r.Format.HYBRID)
    if fp8.recipe == "blockwise":
        return r.Float8BlockScaling(fp8_format=fmt or r.Format.E4M3)
    if fp8.recipe == "mxfp8":
        return r.MXFP8BlockScaling(fp8_format=r.Format.E4M3)
    raise ValueError(f"model.fp8.recipe: {fp8.recipe!r} is not a Transformer Engine recipe")


def check_recipe_hardware(fp8) -> None:
    """Fail at build time, with the recipe's name, on a GPU that cannot run it (TE's own check
    raises at the first forward, deep inside the step)."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"model.fp8.recipe {fp8.recipe!r} (Transformer Engine) needs a CUDA GPU")
    cc = torch.cuda.get_device_capability()
    need = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}[fp8.recipe]
    if cc < need:
        raise RuntimeError(f"model.fp8.recipe {fp8.recipe!r} needs compute capability >= {need[0]}.{need[1]} "
                           f"({'Blackwell' if need >= (10, 0) else 'Hopper' if need >= (9, 0) else 'Ada/Hopper'}); "
                           f"this GPU is {cc[0]}.{cc[1]}")
    if fp8.recipe == "mxfp8" and cc >= (12, 0):
        raise RuntimeError("model.fp8.recipe 'mxfp8': TE does not support MXFP8 on compute capability 12.x yet")


def _default_device():
    """Where TE allocates: the meta device while the model is built on it, else the current GPU."""
    # a string: TE defers initialization only for ``device == "meta"``, which a torch.device never equals
    return "meta" if torch.empty(0).device.type == "meta" else f"cuda:{torch.cuda.current_device()}"


def _to_te(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """TE's sequence parallelism splits the first dimension: (batch, seq, h) -> (seq, batch, h)."""
    return x.transpose(0, 1).contiguous() if ctx.sequence_parallel else x


def _from_te(y: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return y.transpose(0, 1) if ctx.sequence_parallel else y


@functools.lru_cache(maxsize=None)
def _classes():
    """The TE-backed piece classes, defined on first use (importing TE)."""
    te = _te()

    class _NoExtraState:
        """No ``_extra_state`` entries in state dicts: checkpoints hold the tensors named in
        state_dict.py only, identical for every backend. TE's extra state is its FP8 scaling
        metadata; delayed scaling re-warms its amax history after a resume (docs/backends.md)."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

    class _Precision(_NoExtraState):
        """Per-piece precision: bf16 pieces switch TE's FP8 region off; FP8 pieces cache weights."""

        def _setup(self, ctx: ParallelContext, fp8_on: bool):
            self.ctx, self.fp8_on, self._versions = ctx, fp8_on, WeightVersions()

        def _region(self):
            return contextlib.nullcontext() if self.fp8_on else te_autocast(False)

        def _first(self):
            return self._versions.is_first_microbatch(self.parameters()) if self.fp8_on else None

    class TENormLinear(_Precision, te.LayerNormLinear):
        def __init__(self, hidden, outputs, eps, ctx, fp8_on):
            self.names = tuple(outputs)
            self.global_widths = dict(outputs)
            self.local_widths = [_local(w, ctx, f"norm_linear {n}") for n, w in outputs.items()]
            super().__init__(hidden, sum(outputs.values()), eps=eps, sequence_parallel=ctx.sequence_parallel,
                             tp_group=ctx.tp_group, tp_size=ctx.tp_size, bias=False, normalization="RMSNorm",
                             parallel_mode="column" if ctx.tp_size > 1 else None, zero_centered_gamma=False,
                             device=_default_device())
            self._setup(ctx, fp8_on)
            self.hidden = hidden

        def forward(self, x):
            with self._region():
                y = super().forward(_to_te(x, self.ctx), is_first_microbatch=self._first())
            return tuple(_from_te(y, self.ctx).split(self.local_widths, dim=-1))

        def param_layout(self):
            return norm_linear_layout(self.hidden, self.global_widths, self.ctx)

    class TENormMLP(_Precision, te.LayerNormMLP):
        def __init__(self, hidden, ffn, eps, ctx, fp8_on):
            super().__init__(hidden, ffn, eps=eps, sequence_parallel=ctx.sequence_parallel, tp_group=ctx.tp_group,
                             tp_size=ctx.tp_size, bias=False, normalization="RMSNorm", activation="swiglu",
                             set_parallel_mode=ctx.tp_size > 1, zero_centered_gamma=False,
                             device=_default_device())
            self._setup(ctx, fp8_on)
            self.hidden, self.ffn = hidden, ffn

        def forward(self, x):
            with self._region():
                y = super().forward(_to_te(x, self.ctx), is_first_microbatch=self._first())
            return _from_te(y, self.ctx)

        def param_layout(self):
            return norm_mlp_layout(self.hidden, self.ffn, self.ctx)

    class TERowLinear(_Precision, te.Linear):
        def __init__(self, in_features, out_features, ctx, fp8_on):
            super().__init__(in_features, out_features, sequence_parallel=ctx.sequence_parallel,
                             tp_group=ctx.tp_group, tp_size=ctx.tp_size, bias=False,
                             parallel_mode="row" if ctx.tp_size > 1 else None, device=_default_device())
            self._setup(ctx, fp8_on)
            self.global_in = in_features

        def forward(self, x):
            with self._region():
                y = super().forward(_to_te(x, self.ctx), is_first_microbatch=self._first())
            return _from_te(y, self.ctx)

        def param_layout(self):
            return row_linear_layout(self.global_in, self.out_features, self.ctx)

    class TERMSNorm(_NoExtraState, te.RMSNorm):
        def __init__(self, hidden, eps, ctx):
            super().__init__(hidden, eps=eps, zero_centered_gamma=False, device=_default_device())
            self.ctx, self.hidden = ctx, hidden

        def param_layout(self):
            return rmsnorm_layout(self.hidden, self.ctx)

    class TEAttention(_NoExtraState, te.DotProductAttention):
        """GQA, causal; packed documents as "thd" with cu_seqlens built once per forward."""

        def __init__(self, num_heads, num_kv_heads, head_dim, ctx):
            super().__init__(num_heads, head_dim, num_gqa_groups=num_kv_heads, attention_dropout=0.0,
                             qkv_format="bshd", attn_mask_type="causal", tp_size=ctx.tp_size, tp_group=ctx.tp_group)
            self.num_heads = _local(num_heads, ctx, "attention num_heads")
            self.num_kv_heads = _local(num_kv_heads, ctx, "attention num_kv_heads")
            self.head_dim = head_dim

        def forward(self, q, k, v, meta: AttentionMetadata):
            b, s = q.shape[:2]
            if meta.document_ids is not None:
                cu, longest = meta.cached("te_cu_seqlens", lambda: cu_seqlens_from_document_ids(meta.document_ids))
                q, k, v = (t.reshape(b * s, t.shape[2], t.shape[3]) for t in (q, k, v))
                out = super().forward(q, k, v, qkv_format="thd", attn_mask_type="padding_causal",
                                      cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
                return out.reshape(b, s, -1)
            q, k, v = (t.contiguous() for t in (q, k, v))
            if meta.past:  # new queries at the end of the cached keys: bottom-right aligned causal mask
                mask = "causal_bottom_right" if s > 1 else "no_mask"
                return super().forward(q, k, v, attn_mask_type=mask).reshape(b, s, -1)
            return super().forward(q, k, v).reshape(b, s, -1)

        def param_layout(self):
            return {}

    for cls in (TENormLinear, TENormMLP, TERowLinear, TERMSNorm, TEAttention):
        cls.__module__ = __name__
    return dict(norm_linear=TENormLinear, norm_mlp=TENormMLP, row_linear=TERowLinear, norm=TERMSNorm,
                attention=TEAttention)


class TEBackend:
    """Transformer Engine pieces (module docstring); registered as ``model.backend: te``."""

    name = "te"

    def __init__(self, ctx: ParallelContext | None = None, fp8=None, *, fp8_on: bool = True):
        from megatron_phi4.layers.local import LocalBackend

        self.ctx = ctx or ParallelContext()
        self.fp8 = fp8 if fp8 is not None and fp8.enabled else None
        self.fp8_on = self.fp8 is not None and fp8_on  # False: a layer kept in bf16 inside an FP8 model
        self._local = LocalBackend(self.ctx)  # embedding and LM head (module docstring)
        if self.fp8 is not None:
            check_recipe_hardware(self.fp8)
        self._classes = _classes()

    # ------------------------------------------------------------------ precision hooks (backend.py)
    def for_layer(self, layer_idx: int, num_layers: int) -> "TEBackend":
        if self.fp8 is None or not self.fp8.bf16_layer(layer_idx, num_layers):
            return self
        return TEBackend(self.ctx, self.fp8, fp8_on=False)

    def autocast(self):
        """One FP8 region around the decoder layers of a forward pass (its exit reduces the
        amaxes of delayed scaling over ``ctx.amax_group``)."""
        if self.fp8 is None:
            return contextlib.nullcontext()
        return te_autocast(True, te_recipe(self.fp8), self.ctx.amax_group or self.ctx.tp_group)

    # ------------------------------------------------------------------ pieces
    def embedding(self, vocab_size: int, hidden: int) -> nn.Module:
        return self._local.embedding(vocab_size, hidden)

    def norm(self, hidden: int, eps: float) -> nn.Module:
        return self._classes["norm"](hidden, eps, self.ctx)

    def norm_linear(self, hidden: int, outputs: dict[str, int], eps: float) -> nn.Module:
        return self._classes["norm_linear"](hidden, outputs, eps, self.ctx, self.fp8_on)

    def linear(self, in_features: int, out_features: int, parallel: str) -> nn.Module:
        if parallel == "row":
            return self._classes["row_linear"](in_features, out_features, self.ctx, self.fp8_on)
        if parallel == "column":  # the model asks for none today; the local layer keeps the seam complete
            return self._local.linear(in_features, out_features, parallel)
        raise ValueError(f"linear: parallel={parallel!r}, allowed: 'column', 'row'")

    def core_attention(self, num_heads: int, num_kv_heads: int, head_dim: int) -> nn.Module:
        return self._classes["attention"](num_heads, num_kv_heads, head_dim, self.ctx)

    def norm_mlp(self, hidden: int, ffn: int, eps: float) -> nn.Module:
        return self._classes["norm_mlp"](hidden, ffn, eps, self.ctx, self.fp8_on)

    def lm_head(self, hidden: int, vocab_size: int) -> nn.Module:
        return self._local.lm_head(hidden, vocab_size)
