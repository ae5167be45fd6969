"""``phi4-demo``: the whole Phi-4 pipeline, end to end, on a CPU, in one command.

What it runs (each step prints one progress line when it finishes; the trainer's own step lines
are shown while it works)::

    data      the arithmetic task's corpus, SFT conversations and held-out problems, through the
              project's preprocessing (megatron_phi4.data.preprocess / preprocess_chat) and
              indexed-dataset writer, on a trimmed vocabulary (megatron_phi4.demo.arithmetic_data)
    pretrain  a tiny Phi-4 (GQA, SwiGLU, RMSNorm, RoPE) from scratch        } one recipe, run stage
    midtrain  twice the context, RoPE base 10K -> 250K, a tenth of the LR    } by stage with
    sft       chat conversations, loss on the assistant's tokens only        } `torchrun -m
                                                                              } megatron_phi4.train`
                                                                              } on 4 processes
                                                                              } (TP x PP x DP)
    posttrain Pivotal Token Search -> token-level DPO -> judge-guided DPO, with held-out accuracy
              after SFT and after each DPO round (megatron_phi4.demo.posttrain_rounds)

and ends with a table -- validation loss per stage, held-out accuracy with 95% Wilson intervals,
wall time per stage -- printed and written to ``<work-dir>/results.md`` (``results.json`` holds the
same numbers for programs).

Why stage-by-stage launches of the real entry point rather than an in-process loop: the demo
shows what a user runs (``torchrun ... -m megatron_phi4.train --config ... --stage ...``), its
multi-process layout is the real one (gloo ranks, TP/PP/DP groups, sharded checkpoints), and each
stage's end is a checkpoint the next launch starts from -- which is also what makes the demo
resumable: a re-run reuses every finished stage (the data directory's manifest, each training
stage's final checkpoint, the post-training report) and an interrupted stage resumes from its
latest checkpoint. ``--fresh`` starts over.

Settings are checked before any work: a bad option, a layout the model cannot take, or a work
directory that holds a demo run with other settings is refused with a message naming the option.

Layout of ``<work-dir>`` (default ``runs/demo``)::

    settings.json   the settings of the run in this directory (a re-run must match them)
    state.json      finished steps: wall time, validation loss, checkpoint, post-training report
    data/           the task's data (raw JSONL, Phi-4 ids, trimmed ids, problems, vocab.json)
    train/          recipe.yaml, checkpoints/, metrics.jsonl, tensorboard/ (pretrain/midtrain/sft)
    posttrain/      Pivotal Token Search, preference data, DPO runs and their TensorBoard logs
    logs/           the full console output of each training launch
    results.md      the final table (also results.json)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_phi4.demo.pipeline_settings import (
    DemoError, DemoRunError, DemoSettings, STAGES, TRAIN_STAGES, check_settings, demo_recipe, describe_stage,
    parse_args,
)
from megatron_phi4.demo.pipeline_report import DemoResults, StageResult, last_loss, write_results
from megatron_phi4.fileio import atomic_write_json

__all__ = ["run_demo", "main", "DemoError"]

SETTINGS_FILE = "settings.json"
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT")
STATE_FILE = "state.json"


def _atomic_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, sort_keys=True)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise DemoError(f"{path}: not valid JSON ({e}); delete it or run with --fresh") from None


class _Progress:
    """One ``[demo]`` line per finished step, numbered ``k/n``."""

    def __init__(self, settings: DemoSettings, out: Callable[[str], None]):
        self.names = [s for s in STAGES if STAGES.index(s) <= STAGES.index(settings.stop_after)]
        self.out = out

    def __call__(self, stage: str, text: str) -> None:
        k = self.names.index(stage) + 1 if stage in self.names else "?"
        self.out(f"[demo] {k}/{len(self.names)} {stage}: {text}")


def _prepare_work_dir(s: DemoSettings, log) -> Path:
    """Create (or check, or with ``fresh`` empty) the work directory; refuse one that holds another
    demo's run or something that is not a demo run at all -- before any work."""
    work = Path(s.work_dir).resolve()
    saved = _read_json(work / SETTINGS_FILE) if work.is_dir() else None
    if s.fresh and work.exists():
        if saved is None and any(work.iterdir()):
            raise DemoError(f"--fresh: {work} is not empty and holds no {SETTINGS_FILE}: it is not a demo "
                            "work directory, and --fresh deletes only those; choose another --work-dir")
        log(f"[demo] --fresh: deleting {work}")
        shutil.rmtree(work)
        saved = None
    if saved is not None:
        differ = [k for k, v in s.identity().items() if saved.get(k) != v]
        if differ:
            details = "; ".join(f"{k}: was {saved.get(k)!r}, now {s.identity()[k]!r}" for k in differ)
            raise DemoError(f"{work} holds a demo run with other settings ({details}); re-run with the "
                            "same options to resume it, add --fresh to start over, or use another --work-dir")
    elif work.is_dir() and any(p.name not in (SETTINGS_FILE,) for p in work.iterdir()):
        raise DemoError(f"{work} is not empty and holds no {SETTINGS_FILE}: not a demo work directory; "
                        "choose another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    _atomic_json(work / SETTINGS_FILE, s.identity())
    return work


# ----------------------------------------------------------------------------- steps
def _stage_final(ckpt_root: Path, stage: str) -> Optional[Path]:
    """The final checkpoint of ``stage`` in the lineage ``latest`` belongs to, or None."""
    from megatron_phi4.checkpoint.manager import CheckpointManager, has_checkpoints, read_trainer_state

    if not has_checkpoints(ckpt_root):
        return None
    latest = CheckpointManager(ckpt_root).latest()
    if latest is None:
        return None
    return CheckpointManager(ckpt_root, run_id=read_trainer_state(latest).get("run_id")).stage_final(stage)


def _torchrun(s: DemoSettings, recipe: Path, stage: str, log_path: Path, echo) -> int:
    """Launch ``torchrun --standalone -m megatron_phi4.train --config recipe --stage stage`` on
    ``s.nproc`` processes; the console goes to ``log_path`` and the trainer's step/eval lines of
    this stage to ``echo``. Returns torchrun's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={s.nproc}",
           "-m", "megatron_phi4.train", "--config", str(recipe), "--stage", stage]
    # torchrun sets the ranks' rendezvous variables itself; stale ones (a caller that is itself a
    # rank, e.g. a test) must not leak into its workers
    env = {k: v for k, v in os.environ.items()
           if k not in _RANK_VARIABLES and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # the package this driver runs from, also when it is not installed (python -m from a checkout)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as logf:
        logf.write(f"$ {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        try:
            for line in proc.stdout:
                logf.write(line)
                if line.startswith(f"[{stage}]"):
                    echo("        " + line.rstrip())
            return proc.wait()
        except BaseException:
            # Ctrl-C reaches torchrun and its workers through the terminal's process group (they
            # save and stop); anything else that ends the driver must not leave them running.
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-n:])
    except OSError:
        return ""


def _run_data(s: DemoSettings, work: Path, state: dict, progress):
    from megatron_phi4.demo.arithmetic_data import write_arithmetic_data

    done = state.get("data") if (work / "data" / "manifest.json").is_file() else None
    t0 = time.time()
    data = write_arithmetic_data(str(work / "data"), seed=s.seed, sizes=s.sizes(), log=lambda m: None)
    manifest = json.loads(Path(data.manifest).read_text())
    if done is None:
        done = {"wall_s": time.time() - t0, "reused": False}
    else:
        done = dict(done, reused=True)
    counts = manifest["counts"]
    tokens = manifest["tokens"]
    detail = (f"{tokens['pretrain_train']:,} pre-training tokens, {counts['sft_train']:,} SFT conversations, "
              f"{counts['test']:,} held-out problems; vocabulary {manifest['vocab_used']} Phi-4 ids -> "
              f"{manifest['vocab_size']} rows")
    res = StageResult(name="data", what="preprocess (project tools)", layout="1 process", steps=None,
                      val_loss=None, wall_s=done["wall_s"], reused=done["reused"], detail=detail)
    state["data"] = {"wall_s": done["wall_s"]}
    progress("data", f"{detail} ({'reused' if res.reused else f'{res.wall_s:.0f}s'})")
    return res, data


def _run_train_stage(s: DemoSettings, work: Path, recipe: Path, tree: dict, stage: str, state: dict, progress,
                     echo) -> StageResult:
    run_dir = work / "train"
    ckpt_root = run_dir / "checkpoints"
    what = describe_stage(tree, stage)
    steps = next(st["train_steps"] for st in tree["stages"] if st["name"] == stage)
    final = _stage_final(ckpt_root, stage)
    reused = final is not None
    wall = (state.get(stage) or {}).get("wall_s")
    if not reused:
        progress(stage, f"starting: {what}; {steps} steps on {s.nproc} processes "
                        f"({s.layout_name()}); log {work / 'logs' / (stage + '.log')}")
        t0 = time.time()
        rc = _torchrun(s, recipe, stage, work / "logs" / f"{stage}.log", echo)
        wall = (wall or 0.0) + time.time() - t0  # an interrupted stage's earlier part counts too
        state[stage] = {"wall_s": wall, "partial": True}
        _atomic_json(work / STATE_FILE, state)
        final = _stage_final(ckpt_root, stage)
        if rc != 0 or final is None:
            log_path = work / "logs" / f"{stage}.log"
            raise DemoRunError(f"stage {stage}: torchrun exited with status {rc} before the stage finished "
                               f"(full log: {log_path}); re-run the same command to resume from its latest "
                               f"checkpoint. Last lines:\n{_tail(log_path)}")
    val = last_loss(run_dir / "metrics.jsonl", "eval", stage)
    state[stage] = {"wall_s": wall, "checkpoint": str(final), "val_loss": val}
    res = StageResult(name=stage, what=what, layout=s.layout_name(), steps=steps, val_loss=val,
                      wall_s=wall, reused=reused, detail=str(final))
    vl = f"val loss {val:.4f}" if val is not None else "no validation loss"
    progress(stage, f"{steps} steps, {vl}, " + ("reused (finished earlier)" if reused else f"{wall:.0f}s")
             + f"; checkpoint {final}")
    return res


def _run_posttrain(s: DemoSettings, work: Path, sft_checkpoint: str, data, state: dict, progress):
    from megatron_phi4.demo.arithmetic_data import read_problems
    from megatron_phi4.demo.posttrain_rounds import run_posttraining

    done = state.get("posttrain")
    if done is not None and done.get("report") is not None:
        progress("posttrain", "reused (finished earlier)")
        return done["report"], done["wall_s"], True
    progress("posttrain", f"starting: Pivotal Token Search -> token-level DPO -> judge-guided DPO, held-out "
                          f"accuracy on {s.num_eval} problems after SFT and each round")
    eval_problems = read_problems(data.test_problems)[:s.num_eval]
    t0 = time.time()
    try:
        report = run_posttraining(sft_checkpoint, vocab=data.vocab(), data=data, work_dir=str(work / "posttrain"),
                                  method="pts_judge", eval_problems=eval_problems, num_eval=s.num_eval,
                                  budget=s.posttrain_budget(), seed=s.seed,
                                  progress=lambda line: progress("posttrain", line))
    except (RuntimeError, ValueError) as e:
        raise DemoRunError(f"post-training: {e}\n(finished work is kept under {work}; re-running the same "
                           "command resumes from it)") from e
    wall = time.time() - t0
    from megatron_phi4.demo.pipeline_report import report_to_json
    rep = report_to_json(report, work / "posttrain")
    state["posttrain"] = {"wall_s": wall, "report": rep}
    _atomic_json(work / STATE_FILE, state)
    accs = ", ".join(f"{r['name']} {100 * r['greedy']['rate']:.1f}%" for r in rep["rows"])
    progress("posttrain", f"greedy held-out accuracy {accs}; {wall:.0f}s")
    return rep, wall, False


def run_demo(settings: DemoSettings, *, log: Callable[[str], None] = print) -> DemoResults:
    """Run (or resume) the demo in ``settings.work_dir``; returns the results (also written to
    ``results.md`` / ``results.json`` there). Raises :class:`DemoError` with a message for the user."""
    check_settings(settings)  # everything that can be checked without work, first
    t_start = time.time()
    work = _prepare_work_dir(settings, log)
    state = _read_json(work / STATE_FILE) or {}
    progress = _Progress(settings, log)
    results = DemoResults(settings=settings.identity(), work_dir=str(work))

    data_res, data = _run_data(settings, work, state, progress)
    results.stages.append(data_res)
    _atomic_json(work / STATE_FILE, state)
    if settings.stop_after != "data":
        recipe = work / "train" / "recipe.yaml"
        tree = demo_recipe(settings, data, recipe)
        for stage in TRAIN_STAGES:
            results.stages.append(_run_train_stage(settings, work, recipe, tree, stage, state, progress, log))
            _atomic_json(work / STATE_FILE, state)
            if settings.stop_after == stage:
                break
    if settings.stop_after == "posttrain":
        rep, wall, reused = _run_posttrain(settings, work, state["sft"]["checkpoint"], data, state, progress)
        results.add_posttrain(rep, wall, reused)
    results.compute_total()
    results.this_run_wall_s = time.time() - t_start
    write_results(results, work)
    log("")
    log(results.to_markdown())
    log(f"[demo] results: {work / 'results.md'}; TensorBoard: tensorboard --logdir {work}")
    return results


def main(argv: Optional[list] = None) -> int:
    try:
        settings = parse_args(argv)
        run_demo(settings)
    except DemoError as e:
        print(f"phi4-demo: error: {e}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, DemoRunError) else 2
    except KeyboardInterrupt:
        print("phi4-demo: interrupted; re-run the same command to resume", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
