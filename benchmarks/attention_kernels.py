"""Attention kernels for packed documents, compared in one process: time and peak memory of forward +
backward of one layer's core attention (GQA), each checked against the dense-mask result first.

Kernels (those that cannot run on the device are reported as such, not skipped silently):

* ``dense-mask``  SDPA with a boolean [B, 1, S, S] document-causal mask (this project's path before
                  the O(S) work; the baseline);
* ``segments``    causal SDPA per document, a loop over the segments (the library's path);
* ``varlen``      flash-attention varlen over ``cu_seqlens`` (``torch.nn.attention.varlen``, CUDA
                  bf16/fp16; KV heads repeated where this torch's varlen has no GQA) -- a candidate,
                  not used by the library;
* ``flex``        ``flex_attention`` with a document-causal BlockMask, compiled (CUDA only: torch
                  2.13 has no FlexAttention backward on CPU);
* ``causal-row``  plain causal SDPA over each whole row -- wrong for packed rows (it attends across
                  documents), shown as the speed of light for the same S.

Memory on CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On CPU
only times are printed (``step_memory.py`` measures CPU memory, per process).

    python benchmarks/attention_kernels.py                       # CPU, small shapes
    python benchmarks/attention_kernels.py --device cuda --seq 16384 --heads 40 --kv-heads 10 --head-dim 128
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_phi4.layers.attention import _one_document, document_causal_mask  # noqa: E402

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
from megatron_phi4.layers.backend import document_segments  # noqa: E402


def doc_lengths(seq: int, docs: int, seed: int) -> list[int]:
    """``docs`` lengths summing to ``seq`` (seeded, each >= seq / (4 docs))."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(docs, generator=g) + 0.25
    lens = (w / w.sum() * seq).long().tolist()
    lens[-1] += seq - sum(lens)
    return lens


def make_inputs(args, device, dtype):
    g = torch.Generator().manual_seed(0)
    shape = lambda h: (args.batch, args.seq, h, args.head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), generator=g).to(device, dtype) for h in (args.heads, args.kv_heads, args.kv_heads))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lengths(args.seq, args.docs, 1))])
    return q, k, v, doc.expand(args.batch, args.seq).contiguous().to(device)


def k_dense(q, k, v, doc):
    mask = document_causal_mask(doc)
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def k_segments(q, k, v, doc):
    b, s, h, d = q.shape
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    out = torch.cat([_one_document(*(t[x:y] for t in flat)) for x, y in document_segments(doc).bounds])
    return out.view(b, s, h, d)


def k_varlen(q, k, v, doc):
    """Where this torch's varlen_attn has no GQA (2.11), the KV heads are repeated first (O(S) more
    memory) so that the kernel itself is still measured."""
    if varlen_attn is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("varlen_attn needs CUDA and bf16/fp16")
    b, s, h, d = q.shape
    seg = document_segments(doc)
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    else:
        rep = h // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    out = varlen_attn(*flat, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, **kwargs)
    return out.view(b, s, h, d)


_FLEX = {}


def k_flex(q, k, v, doc):
    if not q.is_cuda:
        raise RuntimeError("FlexAttention has no backward on CPU in this torch")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)

    def mask_mod(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (qi >= ki)

    bm = create_block_mask(mask_mod, doc.shape[0], None, doc.shape[1], doc.shape[1], device=q.device)
    out = _FLEX["fn"](*(t.transpose(1, 2) for t in (q, k, v)), block_mask=bm, enable_gqa=True)
    return out.transpose(1, 2)


def k_causal_row(q, k, v, doc):
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


KERNELS = {"dense-mask": k_dense, "segments": k_segments, "varlen": k_varlen, "flex": k_flex,
           "causal-row": k_causal_row}


def measure(fn, q, k, v, doc, iters: int):
    device = q.device
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    upstream = torch.randn_like(q)

    def step():
        for t in leaves:
            t.grad = None
        out = fn(*leaves, doc)
        out.backward(upstream)
        return out

    out = step()  # warm-up (compilation for flex)
    for t in leaves:  # the base must not hold the warm-up's gradients (freed in the next step)
        t.grad = None
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return out.detach(), statistics.median(times) * 1e3, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--kernels", default=",".join(KERNELS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    q, k, v, doc = make_inputs(args, device, dtype)
    lens = doc_lengths(args.seq, args.docs, 1)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{dtype}, batch {args.batch} x seq {args.seq}, {args.docs} documents "
          f"of {min(lens)}..{max(lens)} tokens, heads {args.heads}/{args.kv_heads} x {args.head_dim}")
    with torch.no_grad():  # fp32 reference; KV heads repeated so that on CUDA a fused kernel takes the mask
        rep = args.heads // args.kv_heads
        qh, kh, vh = (t.float().repeat_interleave(r, 2).transpose(1, 2) for t, r in ((q, 1), (k, rep), (v, rep)))
        ref = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=document_causal_mask(doc)).transpose(1, 2)
        del qh, kh, vh
    print(f"{'kernel':<12} {'fwd+bwd ms':>11} {'peak MiB':>10} {'max |err|':>10}  vs dense-mask")
    base_ms = None
    for name in args.kernels.split(","):
        try:
            out, ms, peak = measure(KERNELS[name], q, k, v, doc, args.iters)
        except Exception as e:  # report, do not hide
            print(f"{name:<12} {'-':>11} {'-':>10} {'-':>10}  not run: {type(e).__name__}: {str(e)[:90]}")
            continue
        err = float((out.float() - ref).abs().max())
        base_ms = ms if name == "dense-mask" else base_ms
        speed = f"{base_ms / ms:.2f}x" if base_ms else ""
        note = " (ignores documents)" if name == "causal-row" else ""
        print(f"{name:<12} {ms:>11.2f} {peak:>10.1f} {err:>10.2e}  {speed}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
