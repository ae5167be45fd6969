"""phi4-demo's settings: bad options are refused with a message naming the option before any work
(no work directory is created, an existing one is left untouched), the recipe carries the
mid-training recipe's changes, and the results table has a row per step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_phi4.demo.evaluate import Accuracy
from megatron_phi4.demo.pipeline import main, run_demo
from megatron_phi4.demo.pipeline_report import DemoResults, StageResult, report_to_json
from megatron_phi4.demo.pipeline_settings import (
    MIDTRAIN_ROPE_THETA, DemoError, DemoSettings, demo_recipe, describe_stage, parse_args,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, needle", [
    (["--tp", "3"], "--tp: tensor-parallel size 3 does not divide"),
    (["--tp", "4"], "--tp: tensor-parallel size 4 does not divide"),
    (["--pp", "8"], "--pp"),
    (["--num-eval", "5000"], "--num-eval: 5000 exceeds the 1000 held-out test problems"),
    (["--preset", "smoke", "--num-eval", "65"], "--num-eval: 65 exceeds the 64"),
])
def test_bad_layout_or_size_is_refused_before_any_work(tmp_path, capsys, argv, needle):
    work = tmp_path / "work"
    # --stop-after data: should a check ever let a bad option through, the test costs seconds, not a demo
    assert main(["--work-dir", str(work), "--stop-after", "data"] + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("phi4-demo: error:"), err
    assert not work.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--num-eval", "0"], "--num-eval must be >= 1"),
    (["--sft-steps", "x"], "--sft-steps must be a whole number"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--stop-after", "dpo3"], "invalid choice: 'dpo3'"),
    (["--dp", "-1"], "--dp must be >= 1"),
])
def test_bad_option_values_exit_2_with_usage(tmp_path, capsys, argv, needle):
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as e:
        main(["--work-dir", str(work)] + argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not work.exists()


def test_console_script_reports_errors_on_stderr(tmp_path):
    """The module entry point (what `phi4-demo` runs): exit status 2, one clear line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "megatron_phi4.demo.pipeline", "--work-dir", str(tmp_path / "w"),
                        "--tp", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r
    assert "phi4-demo: error: layout tp3 pp2 dp1: --tp" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_foreign_directories_are_never_used_or_deleted(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for argv in (["--work-dir", str(other)], ["--work-dir", str(other), "--fresh"]):
        with pytest.raises(DemoError, match="not a demo work directory"):
            run_demo(parse_args(argv + ["--stop-after", "data"]), log=lambda m: None)
        assert (other / "precious.txt").read_text() == "keep me"
        assert sorted(p.name for p in other.iterdir()) == ["precious.txt"]


def test_other_settings_in_a_work_dir_are_refused_naming_the_setting(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    first = parse_args(["--work-dir", str(work), "--preset", "smoke", "--stop-after", "data"])
    (work / "settings.json").write_text(json.dumps(first.identity()))
    (work / "state.json").write_text("{}")
    second = parse_args(["--work-dir", str(work), "--preset", "smoke", "--sft-steps", "7", "--stop-after", "sft"])
    with pytest.raises(DemoError, match=r"sft_steps: was 6, now 7.*--fresh"):
        run_demo(second, log=lambda m: None)
    assert sorted(p.name for p in work.iterdir()) == ["settings.json", "state.json"]


def test_recipe_inserts_midtraining_and_the_layout(tmp_path):
    """pretrain -> midtrain (2x context, RoPE base 250K, LR / 10, no warm-up) -> SFT, on tp x pp x dp;
    each pipeline gets at least pp micro-batches; the recipe validates for the world size."""
    from megatron_phi4.demo.arithmetic_data import write_arithmetic_data

    s = parse_args(["--work-dir", str(tmp_path), "--preset", "smoke", "--tp", "1", "--pp", "2", "--dp", "2",
                    "--stop-after", "sft"])
    data = write_arithmetic_data(str(tmp_path / "data"), seed=s.seed, sizes=s.sizes(), log=lambda m: None)
    tree = demo_recipe(s, data, tmp_path / "train" / "recipe.yaml")
    assert yaml.safe_load((tmp_path / "train" / "recipe.yaml").read_text()) == json.loads(json.dumps(tree))
    assert tree["parallel"] == {"tp": 1, "pp": 2, "dp": 2}
    pre, mid, sft = tree["stages"]
    assert [pre["name"], mid["name"], sft["name"]] == ["pretrain", "midtrain", "sft"]
    assert mid["rope_theta"] == MIDTRAIN_ROPE_THETA == 250000.0 and pre["rope_theta"] == 10000.0
    assert "rope_theta" not in sft  # inherits mid-training's base
    assert mid["data"]["seq_length"] == 2 * pre["data"]["seq_length"]
    assert mid["optim"]["lr"] == pytest.approx(pre["optim"]["lr"] / 10) and mid["optim"]["warmup_steps"] == 0
    assert mid["train_steps"] == s.midtrain_steps and pre["train_steps"] == s.pretrain_steps
    for st in tree["stages"]:
        d = st["data"]
        per_rank = d["global_batch_size"] // 2
        assert per_rank % d["micro_batch_size"] == 0 and per_rank // d["micro_batch_size"] >= 2
    assert tree["logging"]["tensorboard"] is True
    # the lines the progress and the table show, read off the recipe
    assert "seq 256, RoPE base 10,000, LR 0.003" in describe_stage(tree, "pretrain")
    assert "seq 512, RoPE base 250,000, LR 0.0003" in describe_stage(tree, "midtrain")
    assert "RoPE base 250,000" in describe_stage(tree, "sft")


def _acc(c, n):
    return Accuracy.of(c, n)


def test_table_has_a_row_per_step_and_refuses_incomplete_reports(tmp_path):
    from megatron_phi4.demo.posttrain_rounds import ModelRow, PostTrainBudget, PostTrainReport

    rows = [ModelRow(n, f"/x/{n}", _acc(c, 500), _acc(c - 5, 500), None if n == "sft" else 40)
            for n, c in (("sft", 100), ("dpo1", 140), ("dpo2", 150))]
    rounds = [{"name": "dpo1", "source": "pts", "questions": 64, "pivotal_tokens": 50, "rollouts": 9000, "pairs": 40,
               "seconds": 200.0, "dpo_steps": 30, "train_seconds": 40.0},
              {"name": "dpo2", "source": "judge", "questions": 64, "responses": 256, "pairs": 40, "seconds": 60.0,
               "dpo_steps": 30, "train_seconds": 41.0}]
    report = PostTrainReport(method="pts_judge", rows=rows, num_eval=500, budget=PostTrainBudget(), rounds=rounds,
                             wall_s=400.0)
    (tmp_path / "eval").mkdir()
    for n, sec in (("sft", 20.0), ("dpo1", 21.0), ("dpo2", 22.0)):
        (tmp_path / "eval" / f"{n}.json").write_text(json.dumps({"seconds": sec}))
    run = tmp_path / "pts_judge" / "dpo1" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "stage": "dpo", "loss": 0.61}\n'
                                       '{"kind": "train", "stage": "dpo", "loss": 0.55}\n{"torn')
    rep = report_to_json(report, tmp_path)
    res = DemoResults(settings=DemoSettings().identity(), work_dir="/w")
    for name in ("data", "pretrain", "midtrain", "sft"):
        res.stages.append(StageResult(name=name, what=name, layout="tp2 pp2 dp1", steps=3, val_loss=1.5, wall_s=10))
    res.add_posttrain(rep, wall_s=420.0, reused=False)
    assert res.compute_total() == 4 * 10 + 420  # post-training's rows are parts of its 420 s
    md = res.to_markdown()
    line = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert list(line) == ["stage", "data", "pretrain", "midtrain", "sft", "pts", "dpo1", "judge", "dpo2",
                          "post-training, other", "**total**"]
    assert "20.0% [16.7, 23.7]" in line["sft"] and "| 20 s |" in line["sft"]  # 100/500, Wilson; its eval time
    assert "0.5500 (train)" in line["dpo1"] and "28.0%" in line["dpo1"] and "| 40 s | 21 s |" in line["dpo1"]
    assert "30.0%" in line["dpo2"] and "— (train)" not in line["dpo2"]
    assert "50 pivotal tokens" in line["pts"] and "| 200 s |" in line["pts"]
    assert "| 16 s |" in line["post-training, other"]  # 420 - (200 + 40 + 21 + 60 + 41 + 22) - 20
    assert "**460 s**" in line["**total**"]
    report.rows = rows[:2]
    with pytest.raises(ValueError, match="no row for dpo2"):
        report_to_json(report, tmp_path)


def test_posttraining_module_is_required_unless_stopping_before_it(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec

    def no_posttrain(name, *a, **k):
        return None if name == "megatron_phi4.demo.posttrain_rounds" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", no_posttrain)
    with pytest.raises(DemoError, match="--stop-after sft"):
        parse_args(["--work-dir", str(tmp_path / "w")])
    parse_args(["--work-dir", str(tmp_path / "w"), "--stop-after", "sft"])
    assert not (tmp_path / "w").exists()



def test_a_failed_launch_names_its_log_and_keeps_finished_work(tmp_path, monkeypatch, capsys):
    """torchrun exiting non-zero: exit status 1, the stage's log named with its last lines, the data kept."""
    import megatron_phi4.demo.pipeline as P

    def failing_torchrun(s, recipe, stage, log_path, echo):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("phi4-train: rank 2: RuntimeError: boom\n")
        return 1

    monkeypatch.setattr(P, "_torchrun", failing_torchrun)
    work = tmp_path / "w"
    assert main(["--work-dir", str(work), "--preset", "smoke", "--stop-after", "sft"]) == 1
    err = capsys.readouterr().err
    assert "stage pretrain: torchrun exited with status 1" in err and str(work / "logs" / "pretrain.log") in err
    assert "RuntimeError: boom" in err and "re-run the same command" in err
    assert (work / "data" / "manifest.json").is_file()
    assert json.loads((work / "state.json").read_text())["pretrain"]["partial"] is True
