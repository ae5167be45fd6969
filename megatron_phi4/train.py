"""Entry point: ``phi4-train --config RECIPE [--stage NAME] [key=value ...]``.

Also ``python -m megatron_phi4.train ...`` and ``torchrun --nproc-per-node N -m megatron_phi4.train
--config F ...``. Without torchrun's environment it runs as one process (world size 1). Without
``--config`` it prepares the bundled sample data under ``runs/sample_data`` and runs
``examples/recipes/tiny_cpu.yaml`` (five stages on CPU in well under a minute).

String values in a recipe may use ``${SAMPLE_DATA}`` (the sample-data directory: ``$SAMPLE_DATA``
if set, else ``runs/sample_data``) and ``${RECIPE_DIR}`` (the recipe file's directory); any other
``${NAME}`` is read from the environment. Whenever the recipe (or an override) uses
``${SAMPLE_DATA}`` and that directory holds no complete sample data, it is prepared first: by
local rank 0 of each node, while the node's other ranks wait for it.

Under ``srun`` without torchrun (one task per GPU) the ranks come from SLURM's variables
(``megatron_phi4/launch/env.py``). A SIGTERM/SIGUSR1 that arrives while the process is still
starting is kept and stops the run after its first step (``megatron_phi4/launch/stop.py``).

Exit status: 0 when the run finished or stopped cleanly on SIGTERM/SIGUSR1 (after a checkpoint;
rank 0 then leaves ``<run_dir>/stopped_by_signal`` for the batch script to requeue the job),
1 on a training error (every rank exits; a rank blocked on a dead peer fails after
``parallel.timeout_minutes``), 2 on a configuration error.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from pathlib import Path

from megatron_phi4.launch.env import apply_slurm_env
from megatron_phi4.launch.stop import EarlyStop, clear_stop_marker, write_stop_marker
from megatron_phi4.process import run_and_exit

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "examples" / "recipes" / "tiny_cpu.yaml"
DEFAULT_SAMPLE_DIR = "runs/sample_data"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phi4-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (default: examples/recipes/tiny_cpu.yaml on sample data)")
    p.add_argument("--stage", help="run only this stage (default: continue the run through all stages)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.sft.optim.lr=1e-6 run_dir=runs/x")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tune_malloc() -> None:
    """Keep large freed buffers (the 100K-vocabulary logits) in the heap instead of returning them to
    the OS after every use: glibc's default mmap/munmap round-trip re-zeroes pages on every step and
    costs ~40% of a small model's step time on CPU. Best effort; Linux/glibc only."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _uses_variable(config: str, overrides: list[str], name: str) -> bool:
    """Whether a string value of the recipe file or of an override contains ``${name}`` (comments
    do not count). An unreadable recipe answers False: load_recipe reports it properly."""
    import yaml

    token = "${" + name + "}"
    if any(token in o.split("=", 1)[-1] for o in overrides):
        return True
    try:
        tree = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError):
        return False

    def walk(node) -> bool:
        if isinstance(node, dict):
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return isinstance(node, str) and token in node

    return walk(tree)


def _ensure_sample_data(sample_dir: str) -> None:
    """Prepare the bundled sample data under ``sample_dir`` unless it is complete: local rank 0
    builds it (under its file lock, so several nodes sharing the directory build it once), the
    node's other ranks poll for the finished manifest (no lock needed, no process group yet)."""
    from megatron_phi4.demo.sample_data import prepare_sample_data, sample_data_ready, wait_for_sample_data

    if sample_data_ready(sample_dir):
        return
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))
    if local_rank == 0:
        print(f"phi4-train: preparing the sample data under {sample_dir}", flush=True)
        prepare_sample_data(sample_dir)
    else:
        wait_for_sample_data(sample_dir)


def main(argv: list[str] | None = None) -> int:
    # launch (megatron_phi4/launch): stop signals are caught from the first instant, SLURM's
    # environment stands in for torchrun's, and the original signal dispositions come back at the end.
    early_stop = EarlyStop().install()
    try:
        apply_slurm_env()
        return _main(argv, early_stop)
    finally:
        early_stop.restore()


def _main(argv: list[str] | None, early_stop: EarlyStop) -> int:
    args = _parser().parse_args(argv)
    _tune_malloc()
    from megatron_phi4.config import ConfigError, load_recipe
    from megatron_phi4.logs import configure_logging

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    config = args.config if args.config is not None else str(DEFAULT_RECIPE)
    sample_dir = os.environ.get("SAMPLE_DATA", DEFAULT_SAMPLE_DIR)
    variables = {"SAMPLE_DATA": sample_dir, "RECIPE_DIR": str(Path(config).resolve().parent)}
    configure_logging(rank)
    try:
        recipe = load_recipe(config, args.overrides, world_size, variables=variables, stage_name=args.stage)
        if args.stage is not None:
            recipe.stage(args.stage)
        if _uses_variable(config, args.overrides, "SAMPLE_DATA"):
            _ensure_sample_data(sample_dir)  # after the recipe is known good, before anything reads data
        from megatron_phi4.training.preflight import check_run_inputs

        check_run_inputs(recipe, args.stage)  # every input of every stage, before any process group
    except ConfigError as e:
        print(f"phi4-train: configuration error: {e}", file=sys.stderr, flush=True)
        return 2

    import torch.distributed as dist

    from megatron_phi4.distributed import init_distributed
    from megatron_phi4.training.trainer import Trainer

    if world_size == 1 and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    dims = init_distributed(recipe.parallel, recipe.model)
    if dims.rank == 0:
        print(f"recipe {recipe.name} ({config}), run_dir {recipe.run_dir}, stages "
              f"{' -> '.join(s.name for s in recipe.stages)}", flush=True)
        clear_stop_marker(recipe.run_dir)  # launch: a stale marker must not requeue this run
    try:
        trainer = Trainer(recipe, dims)
        _hand_over_early_stop(early_stop, trainer, dims.rank)  # launch: a start-up signal stops after step 1
        summary = trainer.run(args.stage)
    except BaseException as e:  # noqa: BLE001
        print(f"phi4-train: rank {dims.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if not isinstance(e, (KeyboardInterrupt,)) and os.environ.get("PHI4_TRACEBACK", "1") == "1":
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Do not wait on peers that may be dead or blocked: leave now, the launcher tears down the rest.
        os._exit(1)
    if dims.rank == 0:
        _print_summary(summary)
        if summary.get("stopped_by_signal"):  # launch: tells examples/slurm/train.sbatch to requeue
            write_stop_marker(recipe.run_dir, summary)
    if dist.is_initialized():
        if dims.world_size > 1:
            # No rank leaves before rank 0 has written what the batch script reads: a rank that
            # dies on its way out (megatron_phi4/process.py) cannot take the requeue with it.
            try:
                dist.barrier()
            except Exception as e:  # noqa: BLE001 -- a peer is gone; what the run had to write is written
                print(f"phi4-train: rank {dims.rank}: a peer left before the final barrier: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                return 1
        dist.destroy_process_group()
    return 0


def _hand_over_early_stop(early_stop, trainer, rank: int) -> None:
    """Route stop signals caught during start-up to the ``stop_signal`` callback's flag (the one its
    ``should_stop`` all-reduces after every step). A recipe that turned that callback off gets
    no stop-on-signal at all: say so when a signal was already caught."""
    target = getattr(trainer.callbacks.get("stop_signal"), "signal", None)
    if target is not None:
        early_stop.hand_over(target)
    elif early_stop.received is not None and rank == 0:
        print("phi4-train: a stop signal arrived during start-up, but the recipe turned the stop_signal "
              "callback off: training continues", file=sys.stderr, flush=True)


def _print_summary(summary: dict) -> None:
    lines = ["=== summary"]
    if summary.get("resumed_from"):
        lines.append(f"  resumed from {summary['resumed_from']}")
    for name, s in summary["stages"].items():
        parts = [f"{s.get('steps', 0)} steps"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val/loss", "val/loss {:.4f}"),
                         ("val/long_doc_loss", "long-doc val/loss {:.4f}"), ("skipped", "{} skipped"),
                         ("tokens_per_s", "{:.0f} tokens/s"), ("wall_s", "{:.1f}s")):
            if s.get(key) is not None:
                parts.append(fmt.format(s[key]))
        if s.get("stopped"):
            parts.append(f"STOPPED: {s['stopped']}")
        lines.append(f"  {name}: " + ", ".join(parts))
    if summary.get("stopped_by_signal"):
        lines.append("  run stopped cleanly on a signal; rerun the same command to resume")
    elif summary.get("stop_reason"):
        lines.append(f"  run stopped by a callback: {summary['stop_reason']}")
    lines.append(f"  total {summary.get('global_step', 0)} steps in {summary.get('wall_s', 0):.1f}s"
                 f" (run {summary.get('run_id')})")
    run_dir = summary.get("run_dir")
    if run_dir:
        lines.append(f"  checkpoints: {summary.get('checkpoints')}  (latest: {summary.get('checkpoints')}/latest;"
                     f" load with megatron_phi4.load_model('{summary.get('checkpoints')}'))")
        lines.append(f"  metrics:     {run_dir}/metrics.jsonl")
        lines.append(f"  tensorboard: tensorboard --logdir {run_dir}/tensorboard")
    print("\n".join(lines), flush=True)


def cli(argv: list[str] | None = None) -> None:
    """The process entry point (``phi4-train``, ``python -m``, ``torchrun -m``): :func:`main`, then
    the process ends without interpreter finalization (gloo's threads are still running; see
    ``megatron_phi4/process.py``)."""
    run_and_exit(main, argv)


if __name__ == "__main__":
    cli()
