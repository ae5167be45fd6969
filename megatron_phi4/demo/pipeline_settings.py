"""The demo's settings: command-line options, presets, the checks made before any work, and the
training recipe (pretrain -> midtrain -> SFT) the settings describe.

Two presets: ``default`` (the README's demo: sized so the whole pipeline runs in under 15 minutes
on two CPU cores and the SFT model gets a useful fraction of held-out problems right -- neither none,
leaving Pivotal Token Search nothing to find, nor all, leaving DPO no room) and ``smoke`` (a couple
of minutes: checks that everything runs; its numbers mean nothing). Any option given explicitly
overrides the preset.

The recipe is the arithmetic task's (:func:`megatron_phi4.demo.arithmetic_run.arithmetic_recipe`:
the tiny Phi-4 body on the trimmed vocabulary, the pre-training and SFT stages) with a mid-training
stage inserted the way the 14B recipe does it (``examples/recipes/phi4_14b.yaml``): twice the
pre-training context, RoPE base raised to 250K (the SFT stage inherits it), a tenth of the
pre-training learning rate, no warm-up -- and the requested TP x PP x DP layout.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_phi4.fileio import atomic_write_text

__all__ = ["DemoError", "DemoRunError", "DemoSettings", "PRESETS", "STAGES", "TRAIN_STAGES",
           "parse_args", "check_settings", "demo_recipe", "describe_stage", "MIDTRAIN_ROPE_THETA",
           "SMOKE_POSTTRAIN_BUDGET"]

STAGES = ("data", "pretrain", "midtrain", "sft", "posttrain")
TRAIN_STAGES = ("pretrain", "midtrain", "sft")
MIDTRAIN_ROPE_THETA = 250000.0  # Phi-4's mid-training RoPE base (paper, section 2.5)


class DemoError(Exception):
    """A problem the user can fix (a bad option, a work directory of another run): exit status 2."""


class DemoRunError(DemoError):
    """A step failed while running (its log says why); re-running resumes: exit status 1."""


def _default_sizes() -> dict:
    from megatron_phi4.demo.arithmetic_data import DataSizes
    return asdict(DataSizes())


# The default preset follows the arithmetic task's own defaults (megatron_phi4.demo.arithmetic_run,
# arithmetic_data), so the demo trains what the task was tuned with; mid-training adds a short stage.
_SMOKE_SIZES = dict(sft_train=400, sft_valid=32, pretrain_solutions=300, pretrain_valid=32,
                    fact_repeats=1, test=64, validation=32, train_pool=64)


def _preset(name: str) -> dict:
    from megatron_phi4.demo.arithmetic_run import DEFAULT_PRETRAIN_STEPS, DEFAULT_SFT_STEPS
    if name == "default":
        return dict(pretrain_steps=DEFAULT_PRETRAIN_STEPS, midtrain_steps=max(1, DEFAULT_PRETRAIN_STEPS // 8),
                    sft_steps=DEFAULT_SFT_STEPS, num_eval=500, sizes=_default_sizes())
    return dict(pretrain_steps=6, midtrain_steps=3, sft_steps=6, num_eval=16, sizes=dict(_SMOKE_SIZES))


PRESETS = ("default", "smoke")
# The default preset's post-training budget: smaller than the benchmark's (PostTrainBudget(), 400
# questions per round), so that PTS stays a minute or two of the demo; the demo's measured table
# (README, docs/demo.md) was produced with exactly this budget.
DEMO_POSTTRAIN_BUDGET = dict(questions_per_round=96, dpo_steps=30, dpo_lr=5e-5)
# The smoke preset's post-training budget (megatron_phi4.demo.posttrain_rounds.PostTrainBudget fields):
# a handful of questions, rollouts, samples and DPO steps -- enough to run every part once.
SMOKE_POSTTRAIN_BUDGET = dict(questions_per_round=4, pts_rollouts=4, samples_per_question=2, max_new_tokens=48,
                              max_pairs=16, dpo_steps=2, dpo_global_batch=4, dpo_micro_batch=2,
                              eval_max_new_tokens=48, eval_batch_size=16)


@dataclass
class DemoSettings:
    work_dir: str = "runs/demo"
    preset: str = "default"
    tp: int = 2
    pp: int = 2
    dp: int = 1
    pretrain_steps: int = 300
    midtrain_steps: int = 37
    sft_steps: int = 300
    num_eval: int = 500
    seed: int = 1234
    stop_after: str = "posttrain"
    fresh: bool = False
    data_sizes: dict = field(default_factory=_default_sizes)

    @property
    def nproc(self) -> int:
        return self.tp * self.pp * self.dp

    def layout_name(self) -> str:
        return f"tp{self.tp} pp{self.pp} dp{self.dp}"

    def sizes(self):
        from megatron_phi4.demo.arithmetic_data import DataSizes
        return DataSizes(**self.data_sizes)

    def identity(self) -> dict:
        """What a run's results depend on: a re-run in the same work directory must match it
        (``stop_after`` may grow, ``fresh`` and ``work_dir`` do not count)."""
        d = asdict(self)
        for k in ("work_dir", "fresh", "stop_after"):
            d.pop(k)
        return json.loads(json.dumps(d))

    def posttrain_budget(self):
        """The post-training budget of this preset (``PostTrainBudget`` fields overridden by
        ``DEMO_POSTTRAIN_BUDGET`` or ``SMOKE_POSTTRAIN_BUDGET``)."""
        from megatron_phi4.demo.posttrain_rounds import PostTrainBudget
        return PostTrainBudget(**(DEMO_POSTTRAIN_BUDGET if self.preset == "default" else SMOKE_POSTTRAIN_BUDGET))



def _positive_int(name):
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return conv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phi4-demo",
        description="Run the whole Phi-4 pipeline on CPU: preprocess -> pre-train (TP x PP x DP on "
                    "tp*pp*dp processes) -> mid-train -> SFT -> Pivotal Token Search -> token-level DPO -> "
                    "judge-guided DPO, then print a table of validation losses and held-out accuracy. "
                    "Re-running resumes; see docs/demo.md.")
    p.add_argument("--work-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="default: the full demo (<15 min on 2 cores); smoke: a couple of minutes, numbers "
                        "meaningless (checks the installation)")
    p.add_argument("--tp", type=_positive_int("--tp"), default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=_positive_int("--pp"), default=2, help="pipeline-parallel size (default 2)")
    p.add_argument("--dp", type=_positive_int("--dp"), default=1,
                   help="data-parallel size (default 1); tp*pp*dp processes are started")
    for stage in TRAIN_STAGES:
        p.add_argument(f"--{stage}-steps", type=_positive_int(f"--{stage}-steps"), default=None,
                       help=f"optimizer steps of {stage} (default: the preset's)")
    p.add_argument("--num-eval", type=_positive_int("--num-eval"), default=None,
                   help="held-out problems per accuracy measurement (default: the preset's, 500)")
    p.add_argument("--seed", type=int, default=1234, help="data, initialization and sampling seed")
    p.add_argument("--stop-after", choices=STAGES, default="posttrain",
                   help="run the pipeline up to this step only (default: all of it)")
    p.add_argument("--fresh", action="store_true", help="delete the work directory's earlier demo run first")
    return p


def parse_args(argv=None) -> DemoSettings:
    """Options -> checked settings; a bad option ends the program with argparse's usage message
    (status 2) or raises :class:`DemoError` naming the option."""
    a = _parser().parse_args(argv)
    preset = _preset(a.preset)
    s = DemoSettings(work_dir=a.work_dir, preset=a.preset, tp=a.tp, pp=a.pp, dp=a.dp,
                     pretrain_steps=a.pretrain_steps or preset["pretrain_steps"],
                     midtrain_steps=a.midtrain_steps or preset["midtrain_steps"],
                     sft_steps=a.sft_steps or preset["sft_steps"],
                     num_eval=a.num_eval or preset["num_eval"], seed=a.seed, stop_after=a.stop_after,
                     fresh=a.fresh, data_sizes=dict(preset["sizes"]))
    check_settings(s)
    return s


def check_settings(s: DemoSettings) -> None:
    """Everything that can be refused without work: the layout against the model, the evaluation
    size against the held-out set, the post-training module's presence."""
    from megatron_phi4.config import ConfigError, ModelConfig, ParallelConfig, from_dict
    from megatron_phi4.demo.arithmetic_run import DEFAULT_MODEL

    if s.preset not in PRESETS:
        raise DemoError(f"preset: got {s.preset!r}, allowed: {', '.join(PRESETS)}")
    if s.stop_after not in STAGES:
        raise DemoError(f"stop_after: got {s.stop_after!r}, allowed: {', '.join(STAGES)}")
    for k in ("tp", "pp", "dp", "pretrain_steps", "midtrain_steps", "sft_steps", "num_eval"):
        v = getattr(s, k)
        if not isinstance(v, int) or v < 1:
            raise DemoError(f"--{k.replace('_', '-')}: must be a whole number >= 1, got {v!r}")
    try:
        s.sizes()
    except ValueError as e:
        raise DemoError(str(e)) from None
    model = from_dict(ModelConfig, dict(DEFAULT_MODEL, vocab_size=64))
    try:
        ParallelConfig(tp=s.tp, pp=s.pp, dp=s.dp).validate(model, s.nproc)
    except ConfigError as e:
        msg = str(e).replace("parallel.tp", "--tp").replace("parallel.pp", "--pp")
        raise DemoError(f"layout {s.layout_name()}: {msg}") from None
    if s.nproc > 16:
        raise DemoError(f"layout {s.layout_name()}: {s.nproc} processes; the CPU demo allows at most 16")
    test = s.data_sizes["test"]
    if s.num_eval > test:
        raise DemoError(f"--num-eval: {s.num_eval} exceeds the {test} held-out test problems of preset "
                        f"{s.preset!r}")
    if STAGES.index(s.stop_after) >= STAGES.index("posttrain"):
        import importlib.util
        if importlib.util.find_spec("megatron_phi4.demo.posttrain_rounds") is None:
            raise DemoError("the post-training step needs megatron_phi4.demo.posttrain_rounds, which this "
                            "installation lacks; run with --stop-after sft, or update the package")
        from megatron_phi4.demo.posttrain_rounds import PostTrainBudget
        q = (s.posttrain_budget() or PostTrainBudget()).questions_per_round
        if 2 * q > s.data_sizes["train_pool"]:
            raise DemoError(f"preset {s.preset!r}: the two DPO rounds need 2 x {q} training-pool questions, the "
                            f"data has {s.data_sizes['train_pool']}")


def _micro(global_batch: int, dp: int, pp: int) -> int:
    """A micro-batch size that gives each pipeline at least ``pp`` micro-batches per step (so the
    1F1B schedule has something to overlap) and divides the per-rank batch."""
    per_rank = global_batch // dp
    m = max(1, per_rank // pp)
    while per_rank % m:
        m -= 1
    return m


def describe_stage(tree: dict, stage: str) -> str:
    """One line on what a stage of the recipe ``tree`` does (for the progress lines and the table)."""
    stages = {st["name"]: st for st in tree["stages"]}
    st = stages[stage]
    theta = tree["model"]["rope_theta"]
    for prev in tree["stages"]:  # the base in force: the last one set up to this stage
        theta = prev.get("rope_theta", theta)
        if prev["name"] == stage:
            break
    d, lr = st["data"], st["optim"]["lr"]
    what = {"pretrain": "pre-train from scratch", "midtrain": "mid-train, longer context",
            "sft": "SFT on chat turns, assistant-only loss"}.get(stage, stage)
    return f"{what}; seq {d['seq_length']}, RoPE base {theta:,.0f}, LR {lr:g}, {d['global_batch_size']} sequences/step"


def demo_recipe(s: DemoSettings, data, path: Path) -> dict:
    """Write the recipe of ``s`` (pretrain -> midtrain -> SFT) to ``path`` (atomic) and return its
    tree. The file is rewritten on every run (same settings, same recipe)."""
    import yaml

    from megatron_phi4.config import ConfigError, RecipeConfig, from_dict
    from megatron_phi4.demo.arithmetic_run import arithmetic_recipe

    run_dir = Path(path).resolve().parent
    vocab = data.vocab()
    tree = arithmetic_recipe(data, vocab, str(run_dir), seed=s.seed, pretrain_steps=s.pretrain_steps,
                             sft_steps=s.sft_steps)
    tree["name"] = "phi4_demo"
    tree["parallel"] = {"tp": s.tp, "pp": s.pp, "dp": s.dp}
    tree["logging"] = {"log_interval": max(1, min(50, s.pretrain_steps // 6)), "tensorboard": True}
    tree["checkpoint"] = {"interval": 100, "keep_last": 2}
    pre, sft = tree["stages"]
    for st in (pre, sft):
        d = st["data"]
        d["micro_batch_size"] = _micro(d["global_batch_size"], s.dp, s.pp)
    pre["rope_theta"] = float(tree["model"]["rope_theta"])
    mid = copy.deepcopy(pre)
    mid["name"] = "midtrain"
    mid["train_steps"] = mid["eval_interval"] = s.midtrain_steps
    mid["rope_theta"] = MIDTRAIN_ROPE_THETA
    md = mid["data"]
    md["seq_length"] = 2 * pre["data"]["seq_length"]
    md["global_batch_size"] = max(s.dp, pre["data"]["global_batch_size"] // 2)  # same tokens per step
    md["micro_batch_size"] = _micro(md["global_batch_size"], s.dp, s.pp)
    lr = pre["optim"]["lr"] / 10
    mid["optim"] = dict(pre["optim"], lr=lr, min_lr=lr / 10, warmup_steps=0)
    tree["stages"] = [pre, mid, sft]
    tree["model"]["max_seq_length"] = max(tree["model"]["max_seq_length"], md["seq_length"], sft["data"]["seq_length"])
    try:
        from_dict(RecipeConfig, copy.deepcopy(tree)).validate(s.nproc)
    except ConfigError as e:
        raise DemoError(f"the demo recipe for these settings is invalid: {e}") from None
    atomic_write_text(path, "# written by phi4-demo (megatron_phi4/demo/pipeline_settings.py)\n"
                      + yaml.safe_dump(tree, sort_keys=False))
    return tree

