"""Callbacks: a recipe adds its own, reorders or turns off the built-ins, and a callback sees every
event in order -- across a stage boundary and across a kill + resume, with its state restored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed_utils import DistributedTestError
from tests.training.helpers import records, synthetic_recipe, train, write_recipe

EVENT_LOG = "tests.training.event_log:EventLog"
STEP = ["pre_step", "post_backward", "pre_optim_step", "post_step"]
CKPT = (["pre_checkpoint"] + [f"checkpoint_progress:{c}" for c in
                              ("model", "optim", "scheduler", "data", "callbacks", "rng", "trainer.json")]
        + ["post_checkpoint"])


def _events(path: Path) -> list[list[dict]]:
    """The logged events, split into runs (each starts with pre_run)."""
    runs: list[list[dict]] = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["event"] == "pre_run":
            runs.append([])
        runs[-1].append(row)
    return runs


def _names(run: list[dict]) -> list[str]:
    return [r["event"] + (f":{r['component']}" if "component" in r else "") for r in run]


def test_recipe_callback_sees_every_event_in_order_across_stages_and_resume(tmp_path):
    log = tmp_path / "events.jsonl"
    tree = synthetic_recipe(tmp_path / "run", pre_steps=4, mid_steps=3, interval=2)
    tree["callbacks"] = [{"type": EVENT_LOG, "path": str(log)}]
    path = write_recipe(tmp_path / "r.yaml", tree)
    with pytest.raises(DistributedTestError, match="died|exit code"):
        train(path, faults={"exit_after_step": 6})  # dies at the start of global step 7 (mid-train step 3)
    train(path)
    first, second = _events(log)
    assert _names(first) == (["pre_run", "pre_stage"] + STEP + STEP + ["post_eval"] + CKPT + STEP + STEP
                             + ["post_eval", "post_stage"] + CKPT + ["pre_stage"] + STEP + STEP + CKPT
                             + ["pre_step"])
    assert [(r["stage"], r["step"]) for r in first if r["event"] == "pre_stage"] == [("pretrain", 0), ("midtrain", 0)]
    assert _names(second) == ["pre_run", "pre_stage"] + STEP + ["post_eval", "post_stage"] + CKPT + ["post_run"]
    assert (second[1]["stage"], second[1]["step"]) == ("midtrain", 2)  # resumed inside the stage
    # the callback's own state came back from the checkpoint: 6 steps seen before, then one more
    assert [r["steps_seen"] for r in second if r["event"] == "post_step"] == [7]


def test_builtins_reordered_turned_off_and_a_stage_only_callback(tmp_path):
    from megatron_phi4.config import load_recipe
    from megatron_phi4.training.callbacks import build_run_callbacks

    stage_log = tmp_path / "mid.jsonl"
    tree = synthetic_recipe(tmp_path / "run", pre_steps=2, mid_steps=2, interval=0)
    tree["callbacks"] = [{"type": "checkpoint"}, {"type": "evaluation", "enabled": False}]
    tree["stages"][1]["callbacks"] = [{"type": EVENT_LOG, "path": str(stage_log)}]
    path = write_recipe(tmp_path / "r.yaml", tree)
    assert [c.name for c in build_run_callbacks(load_recipe(path))] == ["checkpoint", "nonfinite", "metrics",
                                                                          "stop_signal"]
    train(path)
    assert not [r for r in records(tmp_path / "run") if r.get("kind") == "eval"]  # evaluation is off
    assert (tmp_path / "run" / "checkpoints" / "midtrain" / "step_0000002").is_dir()
    events = [json.loads(line) for line in stage_log.read_text().splitlines()]
    assert {e["stage"] for e in events} == {"midtrain"}  # active only while its stage runs
    names = [e["event"] for e in events]
    assert names[0] == "pre_stage" and "post_stage" in names and names.count("post_step") == 2


def test_unknown_callback_is_a_configuration_error(tmp_path):
    from megatron_phi4.config import ConfigError, load_recipe

    tree = synthetic_recipe(tmp_path / "run")
    tree["callbacks"] = [{"type": "no_such_callback"}]
    with pytest.raises(ConfigError, match="callbacks.0.type.*no_such_callback.*allowed"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tree))
