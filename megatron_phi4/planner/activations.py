"""Activation memory of one micro-batch, tensor by tensor, as this code base saves it for backward.

Not a rule of thumb: each term is a tensor that autograd keeps because of a line in
``layers/local.py``, ``models/phi4/model.py`` or ``distributed/vocab_parallel.py`` (the docstrings
below name them), for the local backend with PyTorch's flash SDPA (CUDA, and the CPU flash kernel
that ``scaled_dot_product_attention`` picks for causal rows). Symbols: ``N = b*s`` tokens of the
micro-batch, ``Ns = N/tp`` positions of the residual stream under sequence parallelism (else N),
``a`` bytes per activation element (2 bf16, 4 fp32), ``h`` hidden, ``qd = heads*head_dim/tp``,
``kvd = kv_heads*head_dim/tp``, ``f = ffn/tp``, ``V' = vocab/tp``.

Per decoder block (no recompute)::

    RMSNorm x2           fp32 input x32 (pow saves it)      2 * 4*Ns*h
                         normalized x before the weight      2 * a*Ns*h
                         rsqrt, fp32 per position           2 * 4*Ns
    projection inputs    norm output, all-gathered under SP  2 * a*N*h   (q/k/v share one, gate/up one)
    attention            q, k after RoPE, v                  a*N*(qd + 2 kvd)
                         output (o_proj's input is a view)   a*N*qd
                         packed rows: the per-document       a*N*qd
                         outputs SDPA saves, besides their
                         concatenation (o_proj's input)
                         log-sum-exp, fp32                   4*b*heads/tp*s
    SwiGLU               gate, silu(gate), up, product       4 * a*N*f

Attention (``layers/attention.py``) never builds an ``[s, s]`` mask: one-document rows call causal
SDPA once, packed rows once per document (q, k, v are views of the RoPE outputs, and the
log-sum-exps of all documents add up to one row's), then ``torch.cat`` the per-document outputs:
that copy is o_proj's input, while each SDPA call keeps its own output for its backward.
In fp32 the casts ``x.float()`` / ``.to(x.dtype)`` are no-ops, so the "fp32 input" is the block
input itself and the "normalized x" the fp32 product: the byte counts above hold for both.
``selective`` recompute drops what core attention alone saves (its log-sum-exp and, for packed
rows, the per-document outputs: with a fused kernel there are no ``s^2`` scores to drop, and the
output o_proj reads stays alive), ``full`` keeps only each block's input ``a*Ns*h`` and re-runs
one block at a time in backward.

After the last block, the LM head is fused with the log-softmax (``LMHead.label_log_probs`` ->
``chunked_head_log_probs``): it saves only its input and a few bytes per token; one chunk of
``logits_chunk_tokens`` tokens' fp32 logits exists at a time, in forward and again (recomputed)
in backward, next to an fp32 accumulator of the head's weight gradient (``head_forward_moment``,
``head_backward_moment``). Between pipeline stages the last stage hands over fp32 label
log-probs (``4 N`` bytes), not logits.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_phi4.config import ModelConfig


@dataclass(frozen=True)
class MicroBatchShape:
    """Per-rank sizes of one micro-batch."""

    batch: int
    seq: int
    tp: int
    sequence_parallel: bool
    act_bytes: int  # 2 bf16, 4 fp32
    # rows of several packed documents (pre-/mid-training, packed SFT) take attention's per-document
    # path; False: one document per row (DPO, unpacked data)
    packed_documents: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def stream_tokens(self) -> int:
        """Positions of the residual stream this rank holds (seq/tp under SP)."""
        return self.tokens // self.tp if self.sequence_parallel and self.tp > 1 else self.tokens


def block_saved(cfg: ModelConfig, mb: MicroBatchShape, recompute: str) -> dict[str, int]:
    """Bytes one decoder block keeps for backward, itemized."""
    a, n, ns, t = mb.act_bytes, mb.tokens, mb.stream_tokens, mb.tp
    h = cfg.hidden_size
    if recompute == "full":
        return {"block input (full recompute)": a * ns * h}
    qd, kvd = cfg.num_attention_heads * cfg.head_dim // t, cfg.num_kv_heads * cfg.head_dim // t
    f = cfg.intermediate_size // t
    items = {
        "rmsnorm fp32 inputs": 2 * 4 * ns * h,
        "rmsnorm normalized": 2 * a * ns * h,
        "rmsnorm rsqrt": 2 * 4 * ns,
        "projection inputs": 2 * a * n * h,
        "q, k (RoPE), v": a * n * (qd + 2 * kvd),
        "attention output": a * n * qd,
        **({"attention output per document (before the concatenation)": a * n * qd} if mb.packed_documents else {}),
        "attention log-sum-exp": 4 * mb.batch * (cfg.num_attention_heads // t) * mb.seq,
        "swiglu gate, silu, up, product": 4 * a * n * f,
    }
    if recompute == "selective":  # core attention re-runs: only its inputs (q, k, v) and o_proj's input stay
        items.pop("attention log-sum-exp")
        items.pop("attention output per document (before the concatenation)", None)
    return items


def block_backward_moment(cfg: ModelConfig, mb: MicroBatchShape, recompute: str, *, weight_grad: int,
                          units_keep_grads: bool) -> int:
    """Peak bytes a block's backward adds to what is saved (the block's own saved tensors included).

    The peak is SwiGLU's product backward: the output gradient (all-gathered under SP, a*N*h) is
    alive, down_proj's saved input has been freed, and the gradients of silu(gate) and up
    (2 a*N*f) have just been made; one step earlier down_proj's backward holds the product's
    gradient (a*N*f) and its fresh weight gradient (``weight_grad`` bytes). FSDP keeps a unit's
    fresh gradients until its post-backward hook (``units_keep_grads``), so down_proj's weight
    gradient is still there at the later moment. Full recompute first re-materializes the block's
    saved tensors (in fp32 the first norm's input *is* the kept block input: not counted twice).
    """
    a, n, h = mb.act_bytes, mb.tokens, cfg.hidden_size
    f = cfg.intermediate_size // mb.tp
    extra = a * n * h
    if recompute == "full":
        extra += sum(block_saved(cfg, mb, "none").values()) - (a * mb.stream_tokens * h if a == 4 else 0)
    if units_keep_grads:
        return extra + 2 * a * n * f + weight_grad
    return extra + max(2 * a * n * f, a * n * f + weight_grad)


def rope_tables(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """cos and sin (b, s, head_dim), built once per chunk forward and saved by every RoPE product."""
    return 2 * mb.act_bytes * mb.tokens * cfg.head_dim


def head_chunk_tokens(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """Tokens per chunk of ``chunked_head_log_probs``: ``model.logits_chunk_tokens``, at most the
    micro-batch's ``b*s`` (the head flattens the batch; under SP it runs on the gathered sequence)."""
    return min(cfg.logits_chunk_tokens, mb.tokens)


def head_saved(cfg: ModelConfig, mb: MicroBatchShape) -> dict[str, int]:
    """The final norm and what the fused head (``_ChunkedHeadLogProbs.forward``) saves for backward:
    its input (the norm output, all-gathered under SP: a*N*h; the weight is a parameter) and, per
    token, the int64 label index into this rank's vocabulary slice, two bool masks (label in the
    slice, label ignored) and the fp32 log-normalizer. No logits and no softmax are kept."""
    a, n, ns, h = mb.act_bytes, mb.tokens, mb.stream_tokens, cfg.hidden_size
    return {
        "final rmsnorm": 4 * ns * h + a * ns * h + 4 * ns,
        "lm_head input": a * n * h,
        "head label index, masks, log-normalizer": (8 + 1 + 1 + 4) * n,
    }


def head_forward_moment(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """Peak bytes the fused head's forward adds to ``head_saved``: the fp32 label log-probs it fills
    (4 N) and one chunk's logits, ``c x V'`` fp32 (``linear(...).float()``; exp and the shift are in
    place), next to the chunk's matmul output in the compute dtype for bf16 (the ``.float()``
    copy is made from it)."""
    a, n = mb.act_bytes, mb.tokens
    cast = a if a != 4 else 0
    return 4 * n + head_chunk_tokens(cfg, mb) * (cfg.vocab_size // mb.tp) * (4 + cast)


def head_backward_moment(cfg: ModelConfig, mb: MicroBatchShape) -> int:
    """Peak bytes the fused head's backward (``_ChunkedHeadLogProbs.backward``) adds to the saved
    tensors. Alive for the whole loop: the input gradient ``grad_x`` (a*N*h, filled chunk by chunk),
    the fp32 weight-gradient accumulator (4*V'*h, also for bf16 weights: one rounding at the end,
    like the unchunked product) and the fp32 incoming gradient (4 N). On top, the largest of:

    * one chunk's recomputed logits turned into their gradient in place, fp32 (``c x V' x 4``),
      next to the matmul output (bf16) it was upcast from or the bf16 cast it is turned into;
    * (bf16) the chunk's bf16 gradient (``c x V' x 2``) and its weight-gradient product
      ``d.t() @ xc`` (``V' x h x 2``) before it is added to the accumulator;
    * (bf16) the accumulator's cast to the weight's dtype at the end (``V' x h x 2``).

    The weight gradient then goes to ``.grad``: added in place where it exists (no FSDP), or kept
    as the unsharded parameter's gradient until FSDP's post-backward (``transient_peak`` counts it).
    """
    a, n, h = mb.act_bytes, mb.tokens, cfg.hidden_size
    v, c = cfg.vocab_size // mb.tp, head_chunk_tokens(cfg, mb)
    base = a * n * h + 4 * v * h + 4 * n
    if a == 4:
        return base + c * v * 4
    return base + max(c * v * (4 + a), c * v * a + a * v * h, a * v * h)


def chunk_saved(cfg: ModelConfig, mb: MicroBatchShape, recompute: str, n_layers: int, *, embedding: bool,
                head: bool, pipelined: bool) -> dict[str, int]:
    """Everything one chunk keeps for one in-flight micro-batch, itemized."""
    items: dict[str, int] = {}
    for k, v in block_saved(cfg, mb, recompute).items():
        items[f"blocks: {k}"] = n_layers * v
    items["rope cos/sin"] = rope_tables(cfg, mb)
    if embedding:
        items["embedding ids and mask"] = 9 * mb.tokens  # int64 ids + bool out-of-shard mask
    if head:
        items.update(head_saved(cfg, mb))
        if pipelined:  # the schedule keeps the stage output (fp32 label log-probs) until this micro-batch's backward
            items["label log-probs kept for backward"] = 4 * mb.tokens
    elif pipelined:
        items["stage output kept for backward"] = mb.act_bytes * mb.stream_tokens * cfg.hidden_size
    return items
