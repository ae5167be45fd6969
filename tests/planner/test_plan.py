"""The planner's answers: Phi-4 on 1,920 H100s (4K pre-training, 16K mid-training), reasons for
infeasible layouts, the schedule arithmetic, JSON output and the command line's errors."""
from __future__ import annotations

import json

import pytest

from megatron_phi4.config import model_preset
from megatron_phi4.planner.hardware import Hardware
from megatron_phi4.planner.layout import Layout
from megatron_phi4.planner.memory import GIB, in_flight, peak_memory
from megatron_phi4.planner.search import SearchSpace, evaluate, plan_layouts

PHI4 = model_preset("phi4-14b")


def _run_cli(capsys, *args) -> tuple[int, str]:
    from megatron_phi4.planner.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().out


def test_phi4_on_1920_h100s_prints_a_layout_that_fits_80gb(capsys):
    rc, out = _run_cli(capsys, "--model", "phi4-14b", "--gpus", "1920", "--gpu-memory", "80", "--seq-length", "4096",
                       "--global-batch", "5760", "--precision", "bf16", "--dp-shard", "fsdp")
    assert rc == 0
    assert "Feasible layouts" in out and "#1 in detail" in out
    first = out.split("#1 in detail: ")[1].splitlines()
    assert "parallel.tp=" in first[1] and "data.micro_batch_size=" in first[1]
    total = float(first[2].rsplit("= ", 1)[1].split()[0])
    assert 0 < total <= 80


def test_phi4_1920_best_layouts_fit_and_are_ranked():
    hw = Hardware()
    result = plan_layouts(PHI4, 1920, seq_length=4096, global_batch=5760, hw=hw,
                          space=SearchSpace(precisions=("bf16",), dp_shards=("fsdp",), pp=(1, 2, 4)))
    assert result.feasible
    for c in result.feasible:
        assert c.memory.total <= 80 * GIB and c.layout.gpus == 1920
        assert c.layout.microbatches(5760) * c.layout.micro_batch * c.layout.dp == 5760
    times = [c.time.total for c in result.feasible]
    assert times[0] <= min(times) * 1.011  # best first (ties within 1% ordered by memory)
    assert all(c.problems for c in result.infeasible)


def test_16k_midtraining_needs_recompute_and_has_an_answer(capsys):
    rc, out = _run_cli(capsys, "--gpus", "1920", "--seq-length", "16384", "--global-batch", "1440",
                       "--precision", "bf16", "--dp-shard", "fsdp", "--pp", "1,2,4", "--micro-batch", "1")
    assert rc == 0 and "#1 in detail" in out
    hw = Hardware()
    none = Layout(2, 2, 480, sequence_parallel=True, recompute="none")
    full = Layout(2, 2, 480, sequence_parallel=True, recompute="full")
    no_rc = evaluate(PHI4, none, seq_length=16384, global_batch=1440, hw=hw)
    with_rc = evaluate(PHI4, full, seq_length=16384, global_batch=1440, hw=hw)
    assert not no_rc.feasible and "memory" in no_rc.problems[0]
    assert with_rc.feasible and with_rc.memory.total < no_rc.memory.total / 2


@pytest.mark.parametrize("layout,needle", [
    (Layout(4, 1, 480), "does not divide model.num_kv_heads=10"),
    (Layout(5, 1, 384), "must sit inside one node of 8 GPUs"),
    (Layout(5, 1, 384, sequence_parallel=True), "seq_length 4096 is not divisible by tp=5"),
    (Layout(2, 1, 960, micro_batch=4), "global batch 5760 is not divisible by micro_batch x dp = 4 x 960"),
    (Layout(2, 1, 960, dp_shard="none"), "the planner does not model"),
    (Layout(1, 48, 40), "only 40 layers"),
    (Layout(1, 1, 8, recompute="none"), "memory: needs"),
])
def test_infeasible_layouts_say_why(layout, needle):
    gpus = layout.gpus
    cand = evaluate(PHI4, layout, seq_length=4096, global_batch=5760 if gpus > 8 else 64, hw=Hardware())
    assert not cand.feasible
    assert any(needle in p for p in cand.problems), cand.problems


def test_cli_lists_reasons_for_ruled_out_layouts(capsys):
    rc, out = _run_cli(capsys, "--gpus", "8", "--global-batch", "64", "--precision", "bf16", "--pp", "1",
                       "--show-infeasible", "40")
    assert "Ruled out" in out
    assert "tensor-parallel size 4 does not divide model.num_kv_heads=10" in out
    assert "x memory" in out


def test_json_output_has_every_candidate(capsys):
    rc, out = _run_cli(capsys, "--gpus", "16", "--global-batch", "64", "--pp", "1,2", "--micro-batch", "1",
                       "--recompute", "full", "--json")
    data = json.loads(out)
    assert data["query"]["gpus"] == 16 and data["hardware"]["gpu_memory_gib"] == 80
    n = len(data["feasible"]) + len(data["infeasible"])
    assert n > 0 and all(c["problems"] for c in data["infeasible"])
    for c in data["feasible"]:
        mem = c["memory_bytes"]
        assert mem["total"] == sum(mem[k] for k in ("parameters", "gradients", "optimizer", "gathered_parameters",
                                                    "accumulated_gradients", "pipeline_buffers", "activations",
                                                    "transient", "reserve"))
        assert c["recipe"]["parallel"]["tp"] * c["recipe"]["parallel"]["pp"] * c["recipe"]["parallel"]["dp"] == 16


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "0", "--global-batch", "8"], "--gpus: must be >= 1"),
    (["--gpus", "8", "--global-batch", "8", "--model", "nope"], "model.preset: unknown preset 'nope'"),
    (["--gpus", "8", "--global-batch", "8", "--recompute", "some"], "--recompute: ['some'] not allowed"),
    (["--gpus", "8", "--global-batch", "8", "--seq-length", "32768"], "exceeds the model's max_seq_length 16384"),
])
def test_cli_rejects_bad_input_naming_the_flag(capsys, args, needle):
    from megatron_phi4.planner.cli import main

    with pytest.raises(SystemExit):
        main(args)
    assert needle in capsys.readouterr().err


def test_in_flight_microbatches_follow_the_schedules():
    # 1F1B: rank r holds pp - r micro-batches; fewer micro-batches than stages: GPipe holds all
    assert [in_flight(Layout(1, 4, 1), r, 8) for r in range(4)] == [[4], [3], [2], [1]]
    assert in_flight(Layout(1, 4, 1), 0, 3) == [3]
    # interleaved (torch's warm-up: (v-1) * mpr + 2 (pp-1-r), plus one), split over the rank's chunks
    lay = Layout(1, 4, 1, pp_schedule="interleaved_1f1b", virtual_stages=2)
    assert in_flight(lay, 0, 8) == [7, 4] and in_flight(lay, 3, 8) == [4, 1]
    assert in_flight(Layout(1, 1, 1), 0, 8) == [1]


def test_pipeline_bubble_and_memory_follow_the_schedule():
    hw = Hardware()
    one = evaluate(PHI4, Layout(2, 4, 240, sequence_parallel=True, pp_head_cost=1.75), seq_length=4096,
                   global_batch=5760, hw=hw)
    inter = evaluate(PHI4, Layout(2, 4, 240, sequence_parallel=True, pp_head_cost=1.75,
                                  pp_schedule="interleaved_1f1b", virtual_stages=2),
                     seq_length=4096, global_batch=5760, hw=hw)
    m = 24
    # 1F1B: the bubble is the fill and drain, about (pp - 1) / m of the steady state
    steady = one.time.total - one.time.bubble - one.time.dp_exposed - one.time.optimizer
    assert one.time.bubble / steady == pytest.approx(3 / m, rel=0.25)
    # interleaving shrinks the bubble by v and holds more micro-batches on the first rank
    assert inter.time.bubble < one.time.bubble * 0.6
    assert inter.memory.activations > one.memory.activations


def test_memory_peak_is_the_fullest_pipeline_rank():
    lay = Layout(2, 4, 240, sequence_parallel=True)
    peak = peak_memory(PHI4, lay, seq_length=4096, global_batch=5760)
    assert peak.pp_rank == 0  # 1F1B: stage 0 holds pp micro-batches
    assert peak.in_flight == [4]


def test_nothing_imports_the_planner():
    from tests.test_imports import _imports

    importers = sorted(unit for unit, deps in _imports().items() if unit != "planner"
                       and any(other == "planner" for other, _ in deps))
    assert not importers, f"the planner sits at the top of the import order; imported by {importers}"
