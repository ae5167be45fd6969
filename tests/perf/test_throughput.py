"""benchmarks/throughput.py on CPU with the tiny shape: every local row runs (bf16 through FSDP2 and
through autocast, compiled with aot_eager, FP8 through model.fp8), unavailable rows say why, and the printed
figures follow from the step time by the stated formulas (Megatron's causal FLOP count)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.distributed_utils import run_distributed

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
SEQ = 32


def _run(rank, world, out):
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.main(["--tiny", "--seq", str(SEQ), "--steps", "1", "--warmup", "1", "--out", out])


def test_tiny_throughput_table(tmp_path):
    from megatron_phi4.config import model_preset
    from megatron_phi4.training.metrics import flops_per_token

    out = tmp_path / "thr.jsonl"
    run_distributed(_run, 1, str(out), timeout=600)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    header, rows = lines[0], {r["row"]: r for r in lines[1:]}
    assert header["kind"] == "header" and header["matmul_peak"]["tflops"] > 0 and "megatron" in header["flop_formula"]

    cfg = model_preset("tiny", num_layers=2)
    h, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    # Megatron-LM's num_floating_point_operations (core_v0.16.1), dense GQA + SwiGLU, per token, written out:
    # 3 (fwd, wgrad, dgrad) x 2 (multiply-add) x [MLP + attention (causal: s/2 for QK^T and for PV) + logits]
    megatron = 3 * 2 * (layers * h * f * 3 + layers * (h * (q + 2 * kv) + q * SEQ / 2 * 2 + q * h) + h * v)
    assert flops_per_token(cfg, SEQ, causal=True) == megatron

    local = ["local-bf16-fsdp", "local-bf16-fsdp-compile", "local-fp8-fsdp-compile", "local-bf16-autocast-compile"]
    for name in local:
        r = rows[name]
        assert "skipped" not in r, r
        assert r["seq"] == SEQ and r["layers"] == 2 and r["step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["microbatches"] * r["mbs"] * SEQ / r["step_s"])
        assert r["flops_per_token"] == megatron
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * megatron / 1e12)
        assert r["mfu_measured_peak"] == pytest.approx(r["tflops"] / header["matmul_peak"]["tflops"])
        assert r["mfu_datasheet"] is None  # no datasheet peak for a CPU
        assert 5.0 < r["loss"] < 7.5  # ~ln(512) for random tokens: the model really ran
    # model.fp8 (the trainer's switch): q, k, v, o, gate, up, down of every layer; not the LM head
    assert rows["local-fp8-fsdp-compile"]["fp8_linears"] == 2 * 7 and rows["local-fp8-fsdp-compile"]["fp8_recipe"]
    assert rows["local-bf16-fsdp-compile"]["compile"] and not rows["local-bf16-fsdp"]["compile"]
    for name in ("te-bf16", "te-fp8"):
        assert rows[name]["skipped"]  # a reason, never a number
