"""The local backend's FP8 path (torchao float8 + TP-global scales) on a CUDA GPU (Hopper or newer).

Skipped without CUDA (marker ``gpu``). On the GPU ``torch._scaled_mm`` runs cuBLASLt's FP8 kernels
(tensorwise) and CUTLASS's rowwise ones instead of the CPU reference kernels CI uses, so the same
claims are checked again there: our FP8 linear equals torchao's ``Float8Linear`` bit for bit in bf16,
and a tiny model trains to within 2% of the bf16 loss.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("torchao.float8")

from megatron_phi4.config import FP8Config, model_preset  # noqa: E402
from megatron_phi4.layers import float8 as f8  # noqa: E402


def _fp8_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_capable(), reason="FP8 matmuls need compute capability >= 8.9")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cuda_fp8_linear_equals_torchao(recipe):
    from torchao.float8.float8_linear import Float8Linear

    from megatron_phi4.distributed.tensor_parallel import RowParallelLinear

    torch.manual_seed(0)
    ours = RowParallelLinear(256, 128, None).cuda().bfloat16()
    ref = Float8Linear.from_float(torch.nn.Linear(256, 128, bias=False).cuda().bfloat16(), f8.torchao_config(recipe))
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
    f8.convert_to_float8(ours, FP8Config(enabled=True, recipe=recipe))
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(ours.weight.grad, ref.weight.grad)


@pytest.mark.skipif(not _fp8_capable(), reason="FP8 matmuls need compute capability >= 8.9")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_cuda_fp8_training_within_2_percent_of_bf16(recipe):
    from megatron_phi4.losses import LMLoss
    from megatron_phi4.models.phi4.model import build_model
    from tests.layers.test_float8 import _learnable_batches

    final = {}
    for name, fp8 in (("bf16", FP8Config()), ("fp8", FP8Config(enabled=True, recipe=recipe))):
        model = build_model(model_preset("tiny", num_layers=4, fp8=fp8), "cuda", seed=7)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for mb in _learnable_batches(40):
            mb = {k: v.cuda() for k, v in mb.items()}
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(mb["input_ids"])
            out = LMLoss()(logits.float(), mb)
            loss = out.loss_sum / LMLoss().units(mb)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        final[name] = sum(losses[-5:]) / 5
    assert abs(final["fp8"] - final["bf16"]) / final["bf16"] < 0.02, final
