"""Core attention without dense masks: every path equals the dense-mask reference (values and
gradients, fp32), plain / one-document rows take plain causal SDPA, and no operator ever produces an
[S, S] tensor in a training step of the model (plain, one document per row, packed)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_phi4.config import model_preset
from megatron_phi4.layers.attention import SDPAttention, causal_attention, document_causal_mask
from megatron_phi4.layers.backend import AttentionMetadata, ParallelContext, document_segments
from megatron_phi4.models.phi4.model import build_model
from tests.tensor_sizes import LargestTensor

B, S, HEADS, KV, D = 2, 23, 4, 2, 8


def _doc_ids(kind: str) -> torch.Tensor | None:
    if kind == "plain":
        return None
    if kind == "one-document-per-row":
        return torch.full((B, S), 3, dtype=torch.long)
    doc = torch.zeros(B, S, dtype=torch.long)
    doc[0, 5:] = 1
    doc[0, 6:] = 2  # a one-token document
    doc[0, 17:] = 3
    doc[1, 11:] = 1
    return doc


def _reference(q, k, v, doc):
    mask = None if doc is None else document_causal_mask(doc)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, S, -1)


@pytest.mark.parametrize("kind", ["plain", "one-document-per-row", "packed"])
def test_attention_equals_dense_mask_reference_values_and_grads(kind):
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, S, h, D, generator=g) for h in (HEADS, KV, KV)]
    doc = _doc_ids(kind)
    core = SDPAttention(HEADS, KV, D, ParallelContext())
    upstream = torch.randn(B, S, HEADS * D, generator=g)
    results = []
    for fn in (lambda q, k, v: core(q, k, v, AttentionMetadata(S, 0, doc)), lambda q, k, v: _reference(q, k, v, doc)):
        leaves = [t.clone().requires_grad_(True) for t in qkv]
        out = fn(*leaves)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_one_document_per_row_takes_plain_causal_attention_and_packed_rows_do_not():
    meta = AttentionMetadata(S, 0, _doc_ids("one-document-per-row"))
    assert meta.causal_only
    core = SDPAttention(HEADS, KV, D, ParallelContext())
    q, k, v = torch.randn(B, S, HEADS, D), torch.randn(B, S, KV, D), torch.randn(B, S, KV, D)
    core(q, k, v, meta)
    assert "document_segments" not in meta.cache  # no segmentation was built
    packed = AttentionMetadata(S, 0, _doc_ids("packed"))
    assert not packed.causal_only
    core(q, k, v, packed)
    assert "document_segments" in packed.cache
    assert AttentionMetadata(1, 4).causal_only is False  # decoding after a cache


def test_document_segments_over_the_flattened_batch():
    doc = torch.tensor([[7, 7, 8, 8, 8], [0, 0, 0, 0, 0], [1, 2, 1, 1, 3]])
    seg = document_segments(doc)
    # a document starts at every row and at every change of id (a recurring id starts a new one)
    assert seg.bounds == ((0, 2), (2, 5), (5, 10), (10, 11), (11, 12), (12, 14), (14, 15))
    assert seg.cu_seqlens.tolist() == [0, 2, 5, 10, 11, 12, 14, 15] and seg.cu_seqlens.dtype == torch.int32
    assert seg.max_len == 5


def test_chunked_decoding_with_bottom_right_causal_equals_dense_mask():
    g = torch.Generator().manual_seed(1)
    past, seq = 9, 5
    q = torch.randn(B, seq, HEADS, D, generator=g)
    k, v = torch.randn(B, past + seq, KV, D, generator=g), torch.randn(B, past + seq, KV, D, generator=g)
    got = causal_attention(q, k, v, past)
    mask = torch.ones(seq, past + seq, dtype=torch.bool).tril(diagonal=past)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["plain", "one-document-per-row", "packed"])
def test_training_step_never_makes_a_seq_by_seq_tensor(kind):
    seq = 1024
    cfg = model_preset("tiny", logits_chunk_tokens=64)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=g)
    doc = None
    if kind == "one-document-per-row":
        doc = torch.zeros(1, seq, dtype=torch.long)
    elif kind == "packed":
        doc = (torch.arange(seq) // 300).unsqueeze(0)  # 4 documents
    with LargestTensor() as big:
        model(ids[:, :-1], document_ids=doc, labels=ids[:, 1:]).sum().backward()
    # seq x seq would be 1M elements; the largest legitimate ones are seq x ffn (131K)
    assert big.numel < seq * seq // 4, f"{big.op} made a tensor of {big.numel} elements"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_documents_on_cuda_equal_dense_mask_values_and_grads(dtype):
    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(B, S, h, 64, generator=g) for h in (HEADS, KV, KV)]
    doc = _doc_ids("packed").cuda()
    upstream = torch.randn(B, S, HEADS * 64, generator=g).cuda()
    core = SDPAttention(HEADS, KV, 64, ParallelContext())
    results = []
    for use_core in (True, False):
        leaves = [t.to("cuda", dtype if use_core else torch.float32).requires_grad_(True) for t in qkv]
        out = core(*leaves, AttentionMetadata(S, 0, doc)) if use_core else _reference(*leaves, doc)
        (out.float() * upstream).sum().backward()
        results.append([out.detach().float()] + [t.grad.float() for t in leaves])
    tol = dict(rtol=2e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, **tol)


@pytest.mark.gpu
def test_chunked_decoding_on_cuda_bf16_gqa_equals_dense_mask():
    g = torch.Generator().manual_seed(4)
    past, seq = 40, 9
    q = torch.randn(B, seq, HEADS, 64, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(B, past + seq, KV, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    got = causal_attention(q, k, v, past)
    mask = torch.ones(seq, past + seq, dtype=torch.bool, device="cuda").tril(diagonal=past)
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
