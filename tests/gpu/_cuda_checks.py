"""The CUDA-path checks behind tests/gpu/test_cuda_path.py, one per command-line name.

Each check runs in its own interpreter (``python -m tests.gpu._cuda_checks NAME``) and prints one
JSON line: the pytest process never initializes CUDA (the suite forks gloo ranks elsewhere, and a
CUDA context does not survive a fork), and a crashed kernel fails one check, not the session.
One process, world size 1, NCCL. ``--cpu`` runs the same code on the CPU with gloo: a dry run of the
checks themselves (nothing about CUDA is proven by it).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

SEQ, MBS, N_MB = 512, 2, 2


def small_cfg():
    from megatron_phi4.config import ModelConfig

    # head_dim 64 (flash attention's sweet spot), GQA 4:1 like Phi-4, divisible by 16 for FP8 later.
    return ModelConfig(vocab_size=2048, hidden_size=512, num_layers=4, num_attention_heads=8, num_kv_heads=2,
                       intermediate_size=1536, max_seq_length=SEQ, rope_theta=10000.0)


def init(cpu: bool = False) -> torch.device:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29300 + os.getpid() % 1000))
    if cpu:
        dist.init_process_group("gloo", rank=0, world_size=1)
        return torch.device("cpu")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    return device


def batches(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_MB):
        ids = torch.randint(0, small_cfg().vocab_size, (MBS, SEQ + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)})
    return out


def engine(device, **parallel):
    from megatron_phi4.config import ParallelConfig
    from megatron_phi4.distributed.parallel_dims import ParallelDims
    from megatron_phi4.engine import ParallelEngine

    pcfg = ParallelConfig(**parallel)
    dims = ParallelDims.build(pcfg, device=device, model_cfg=small_cfg())
    return ParallelEngine(small_cfg(), pcfg, dims, seed=0, device=device)


def step(eng, mbs):
    from megatron_phi4.losses import LMLoss

    loss_fn = LMLoss()
    eng.zero_grad()
    out = eng.forward_backward(mbs, loss_fn, eng.global_units(mbs, loss_fn))
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    grads = {n: full(p.grad).detach().float().cpu() for n, p in eng.named_parameters()}
    return out["loss"], grads


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_bf16_vs_fp32(device) -> dict:
    """fp32 reference vs bf16 through FSDP2's policy and through autocast; then the fused AdamW step."""
    from megatron_phi4.config import OptimizerConfig
    from megatron_phi4.training.optimizer import build_optimizer

    mbs = batches(device)
    ref_loss, ref_grads = step(engine(device, mixed_precision="fp32"), mbs)
    out = {"ref_loss": ref_loss}
    for name, kw in (("fsdp", dict(mixed_precision="bf16")), ("autocast", dict(mixed_precision="bf16", dp_shard="none"))):
        eng = engine(device, **kw)
        loss, grads = step(eng, mbs)
        errs = [rel(grads[n], ref_grads[n]) for n in ref_grads]
        out[name] = {"loss": loss, "max_grad_err": max(errs), "mean_grad_err": sum(errs) / len(errs),
                     "param_dtypes": sorted({str(p.dtype) for p in eng.parameters()}),
                     "grad_dtypes": sorted({str(p.grad.dtype) for p in eng.parameters()})}
        # The trainer's optimizer: fused AdamW on CUDA; a few steps on one batch must lower its loss.
        opt = build_optimizer(eng, OptimizerConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0))
        losses = [loss]
        for _ in range(3):
            opt.step()
            losses.append(step(eng, mbs)[0])
        out[name].update(fused=bool(opt.defaults.get("fused")), losses_after_steps=losses)
    return out


def check_compile(device) -> dict:
    """FSDP2 bf16 engine with every block compiled by inductor vs the same engine eager."""
    mbs = batches(device, seed=1)
    eager = engine(device, mixed_precision="bf16")
    loss_e, grads_e = step(eager, mbs)
    compiled = engine(device, mixed_precision="bf16", compile=True, compile_backend="inductor")
    loss_c, grads_c = step(compiled, mbs)
    loss_c2, _ = step(compiled, mbs)  # second call: the compiled code, no recompilation needed
    blocks = compiled.spec.blocks(compiled.model_parts[0])
    return {"loss_eager": loss_e, "loss_compiled": loss_c, "loss_compiled_again": loss_c2,
            "max_grad_err": max(rel(grads_c[n], grads_e[n]) for n in grads_e),
            "same_names": list(grads_c) == list(grads_e),
            "all_compiled": all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)}


def check_flash(device) -> dict:
    """Unpacked batches (one document per row) run with only the flash-attention SDPA kernel allowed,
    forward and backward, with bf16 through FSDP2 and through autocast. A masked call under the same
    restriction must fail, which shows the restriction bites."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, kw in (("fsdp", dict(mixed_precision="bf16")), ("autocast", dict(mixed_precision="bf16", dp_shard="none"))):
        eng = engine(device, **kw)
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                loss, _ = step(eng, batches(device, seed=2))
            out[name] = {"ok": True, "loss": loss}
        except RuntimeError as e:
            out[name] = {"ok": False, "error": str(e)[:300]}
    q = torch.randn(1, 8, 128, 64, device=device, dtype=torch.bfloat16)
    mask = torch.ones(128, 128, device=device, dtype=torch.bool).tril()
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        out["masked_call_refused"] = False
    except RuntimeError:
        out["masked_call_refused"] = True
    return out


CHECKS = {"bf16_vs_fp32": check_bf16_vs_fp32, "compile": check_compile, "flash": check_flash}

if __name__ == "__main__":
    dev = init(cpu="--cpu" in sys.argv)
    try:
        result = CHECKS[sys.argv[1]](dev)
    finally:
        dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)
