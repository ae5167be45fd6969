"""Metrics: TensorBoard events read back with tensorboard's own reader, metrics.jsonl, FLOP arithmetic."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_phi4.config import ModelConfig, model_preset
from megatron_phi4.training.metrics import (MetricsLogger, flops_per_token, matmul_params, memory_metrics,
                                            read_metrics, throughput_metrics)


def test_scalars_reach_tensorboard_and_jsonl(tmp_path):
    lines = []
    log = MetricsLogger(tmp_path, enabled=True, log_interval=2, console=lines.append)
    for step in (1, 2, 3):
        log.log_step("pretrain", step, {"loss": 4.0 - step, "lr": 1e-3 * step})
    log.log_eval("pretrain", 3, {"loss": 2.5})
    log.log_step("midtrain", 1, {"loss": 0.5, "lr": 1e-4})
    log.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    assert [e.step for e in acc.Scalars("val/loss")] == [3]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["stage"], r["step"], r["global_step"]) for r in rows] == [
        ("train", "pretrain", 1, 1), ("train", "pretrain", 2, 2), ("train", "pretrain", 3, 3),
        ("eval", "pretrain", 3, 3), ("train", "midtrain", 1, 4)]
    assert len([l for l in lines if "eval" not in l]) == 1 and "[pretrain] step 2" in lines[0]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False)
    log.log_step("s", 1, {"loss": 1.0})
    log.log_eval("s", 1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_torn_line_from_a_killed_run_is_skipped_and_resume_appends_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1}) + "\n" + '{"kind": "tra')
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, console=lambda _: None)
    log.log_step("s", 2, {"loss": 1.0})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_flops_per_token_for_phi4_14b_by_hand():
    cfg = model_preset("phi4-14b")
    per_layer = 5120 * 5120 * 2 + 2 * 5120 * 1280 + 3 * 5120 * 17920  # q, o; k, v; gate, up, down
    n = 40 * per_layer + 5120 * 100352  # plus the LM head; the embedding is a lookup
    # Every parameter but the embedding and the 81 norm vectors is a matmul parameter.
    assert n == 14_659_507_200 - 100352 * 5120 - 81 * 5120 == matmul_params(cfg)
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 40 * 5120 * 4096


def test_throughput_and_mfu_arithmetic():
    cfg = model_preset("phi4-14b")
    f = flops_per_token(cfg, 4096)
    m = throughput_metrics(tokens=8_000_000, seconds=10.0, cfg=cfg, seq_length=4096, world_size=8, peak_tflops=989.0)
    assert m["tokens_per_s"] == pytest.approx(800_000.0)
    assert m["tflops_per_device"] == pytest.approx(800_000.0 * f / 8 / 1e12)
    assert m["mfu"] == pytest.approx(m["tflops_per_device"] / 989.0)
    assert throughput_metrics(1, 1.0, cfg, 4096, 1, 0.0)["mfu"] == 0.0


def test_memory_metrics_on_cpu():
    m = memory_metrics("cpu")
    assert m["mem/max_rss_gb"] > 0.01


def test_causal_flops_are_megatrons_formula_for_phi4():
    """Megatron-LM's num_floating_point_operations (megatron/training/training.py, core_v0.16.1) for
    a dense GQA model with SwiGLU and no MTP, per token, written out with its own terms."""
    cfg = ModelConfig()  # Phi-4 14B
    h, ffn, layers, vocab, s = 5120, 17920, 40, 100352, 4096
    query, key, value = 128 * 40, 128 * 10, 128 * 10
    attention = h * (query + key + value) + query * s / 2 * 2 + query * h  # qkv, causal core, out proj
    mlp = h * ffn * 3  # SwiGLU: h -> 2 ffn, ffn -> h
    expected = 3 * 2 * (layers * (mlp + attention) + h * vocab)
    assert flops_per_token(cfg, s, causal=True) == expected
    # PaLM's full score matrix adds exactly the other half of the attention term.
    assert flops_per_token(cfg, s) - expected == 6 * layers * query * s
