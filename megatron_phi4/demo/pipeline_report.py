"""The demo's final table: one row per step -- validation loss, held-out accuracy (greedy and
sampled, with 95% Wilson intervals) after SFT and after each DPO round, wall time -- as Markdown
(``results.md``) and JSON (``results.json``), both written atomically.

Accuracy comes from the post-training report (:func:`megatron_phi4.demo.posttrain_rounds.run_posttraining`:
one row per model, ``sft``, ``dpo1``, ``dpo2``, each with ``.checkpoint``, ``.greedy`` and ``.sampled``
:class:`~megatron_phi4.demo.evaluate.Accuracy`); :func:`report_to_json` turns it into plain data
(kept in ``state.json``, so a re-run shows the table without evaluating again).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from megatron_phi4.fileio import atomic_write_json, atomic_write_text

__all__ = ["StageResult", "DemoResults", "write_results", "report_to_json", "POSTTRAIN_MODELS"]

POSTTRAIN_MODELS = ("sft", "dpo1", "dpo2")
_TRAIN_NAMES = ("pretrain", "midtrain", "sft")
_WHAT = {"dpo1": "token-level DPO on the PTS pairs", "dpo2": "judge-guided DPO (full responses)"}
_PAIRS_ROW = {"pts": "pts", "judge": "judge", "full": "sampling"}


def _pairs_what(rnd: dict) -> str:
    if rnd["source"] == "pts":
        return (f"Pivotal Token Search on {rnd.get('questions', '?')} questions: {rnd.get('pivotal_tokens', '?')} "
                f"pivotal tokens, {rnd.get('rollouts', '?')} rollouts -> {rnd.get('pairs', '?')} pairs")
    return (f"{rnd.get('responses', '?')} sampled responses to {rnd.get('questions', '?')} questions, rule judge "
            f"-> {rnd.get('pairs', '?')} pairs")


@dataclass
class StageResult:
    name: str
    what: str
    layout: str
    steps: Optional[int]
    val_loss: Optional[float]
    wall_s: Optional[float]
    reused: bool = False
    detail: str = ""
    greedy: Optional[dict] = None   # Accuracy fields: correct, total, rate, low, high
    sampled: Optional[dict] = None
    eval_wall_s: Optional[float] = None  # evaluating this stage's model (greedy + sampled)
    loss_kind: str = "val"  # "val": held-out loss; "train": the last training loss (DPO rounds hold out no pairs)


@dataclass
class DemoResults:
    settings: dict
    work_dir: str
    stages: List[StageResult] = field(default_factory=list)
    posttrain_wall_s: Optional[float] = None
    posttrain_markdown: str = ""
    total_wall_s: float = 0.0
    this_run_wall_s: float = 0.0

    def row(self, name: str) -> Optional[StageResult]:
        return next((r for r in self.stages if r.name == name), None)

    def add_posttrain(self, rep: dict, wall_s: float, reused: bool) -> None:
        """Attach the post-training report (:func:`report_to_json`): accuracy to the ``sft`` row, and
        per round a pair-making row (PTS / sampling + judge) and a DPO row."""
        self.posttrain_wall_s = wall_s
        self.posttrain_markdown = rep.get("markdown", "")
        rows = {r["name"]: r for r in rep["rows"]}
        sft = self.row("sft")
        if sft is not None:
            sft.greedy, sft.sampled, sft.eval_wall_s = rows["sft"]["greedy"], rows["sft"]["sampled"], \
                rows["sft"].get("eval_wall_s")
        for rnd in rep["rounds"]:
            name, row = rnd["name"], rows.get(rnd["name"], {})
            self.stages.append(StageResult(
                name=_PAIRS_ROW.get(rnd["source"], rnd["source"]), what=_pairs_what(rnd), layout="1 process",
                steps=None, val_loss=None, wall_s=rnd.get("seconds"), reused=reused))
            self.stages.append(StageResult(
                name=name, what=_WHAT.get(name, name), layout="1 process", steps=rnd.get("dpo_steps"),
                val_loss=row.get("loss"), loss_kind="train", wall_s=rnd.get("train_seconds"), reused=reused,
                detail=row.get("checkpoint", ""), greedy=row.get("greedy"), sampled=row.get("sampled"),
                eval_wall_s=row.get("eval_wall_s")))

    def compute_total(self) -> float:
        """Wall time of the whole demo: the data and training steps plus post-training as a whole
        (its rows -- PTS, DPO rounds, evaluations -- are parts of ``posttrain_wall_s``)."""
        self.total_wall_s = sum(r.wall_s or 0.0 for r in self.stages if r.name in ("data",) + _TRAIN_NAMES) \
            + (self.posttrain_wall_s or 0.0)
        return self.total_wall_s

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        def acc(a):
            if not a:
                return "—"
            return f"{100 * a['rate']:.1f}% [{100 * a['low']:.1f}, {100 * a['high']:.1f}]"

        def num(v, fmt):
            return "—" if v is None else fmt.format(v)

        n_eval = next((r.greedy["total"] for r in self.stages if r.greedy), None)
        lines = ["| stage | what | layout | steps | loss | held-out acc., greedy (95% CI) "
                 "| held-out acc., sampled T=0.7 (95% CI) | wall | eval wall |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.stages:
            loss = num(r.val_loss, "{:.4f}") + (" (train)" if r.val_loss is not None and r.loss_kind == "train" else "")
            lines.append(f"| {r.name} | {r.what} | {r.layout} | {num(r.steps, '{}')} | {loss} "
                         f"| {acc(r.greedy)} | {acc(r.sampled)} | {num(r.wall_s, '{:.0f} s')} "
                         f"| {num(r.eval_wall_s, '{:.0f} s')} |")
        if self.posttrain_wall_s is not None:
            post = [r for r in self.stages if r.name not in ("data",) + _TRAIN_NAMES]
            sft = self.row("sft")
            counted = sum((r.wall_s or 0.0) + (r.eval_wall_s or 0.0) for r in post) + ((sft and sft.eval_wall_s) or 0.0)
            rest = self.posttrain_wall_s - counted
            if rest >= 1:
                lines.append(f"| post-training, other | loading models, writing files | | | | | | {rest:.0f} s | |")
        lines.append(f"| **total** | | | | | | | **{self.total_wall_s:.0f} s** | |")
        notes = []
        if n_eval:
            notes.append(f"Accuracy: fraction of {n_eval} held-out test problems (never seen in any stage) whose "
                         "last \\boxed{} holds the right integer; 95% Wilson score intervals. Loss: the stage's "
                         "validation loss; for the DPO rounds, which hold out no pairs, the last training DPO loss.")
        reused = [r.name for r in self.stages if r.reused]
        if reused:
            notes.append(f"Reused from an earlier run in this work directory: {', '.join(reused)} "
                         f"(wall times are those of the run that produced them; this run took "
                         f"{self.this_run_wall_s:.0f} s).")
        s = self.settings
        notes.append(f"Settings: preset {s.get('preset')}, layout tp{s.get('tp')} pp{s.get('pp')} dp{s.get('dp')}, "
                     f"seed {s.get('seed')}.")
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_results(results: DemoResults, work_dir) -> None:
    work = Path(work_dir)
    extra = "\n## Post-training report\n\n" + results.posttrain_markdown if results.posttrain_markdown else ""
    atomic_write_text(work / "results.md", "# phi4-demo results\n\n" + results.to_markdown() + extra)
    atomic_write_json(work / "results.json", results.to_json())


def _accuracy(a) -> Optional[dict]:
    if a is None:
        return None
    return {k: (float(getattr(a, k)) if k in ("rate", "low", "high") else int(getattr(a, k)))
            for k in ("correct", "total", "rate", "low", "high")}


def last_loss(metrics_path: Path, kind: str, stage: Optional[str] = None) -> Optional[float]:
    """The last ``loss`` of rows of ``kind`` ("train" or "eval", of ``stage`` if given) in a
    metrics.jsonl; a resumed run appends, so the last wins; a killed run's torn line is skipped."""
    loss = None
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("kind") == kind and (stage is None or row.get("stage") == stage) and "loss" in row:
                loss = float(row["loss"])
    return loss


def report_to_json(report, posttrain_dir) -> dict:
    """A :class:`~megatron_phi4.demo.posttrain_rounds.PostTrainReport` as plain data, with what its
    work directory adds: each model's evaluation time (``eval/<name>.json``) and each DPO round's
    last training loss (``<method>/<round>/run/metrics.jsonl``). A report without the three models
    is an error: the table would silently miss them."""
    root = Path(posttrain_dir)
    rows = []
    for row in report.rows:
        out = {"name": row.name, "checkpoint": str(row.checkpoint), "greedy": _accuracy(row.greedy),
               "sampled": _accuracy(row.sampled), "pairs": row.pairs}
        try:
            out["eval_wall_s"] = float(json.loads((root / "eval" / f"{row.name}.json").read_text())["seconds"])
        except (OSError, ValueError, KeyError):
            out["eval_wall_s"] = None
        if row.name != "sft":
            out["loss"] = last_loss(root / report.method / row.name / "run" / "metrics.jsonl", "train")
        rows.append(out)
    names = [r["name"] for r in rows]
    missing = [m for m in POSTTRAIN_MODELS if m not in names]
    if missing:
        raise ValueError(f"post-training report: no row for {', '.join(missing)} (rows: {names})")
    return {"method": report.method, "rows": rows, "rounds": [dict(r) for r in report.rounds],
            "wall_s": float(report.wall_s), "markdown": report.to_markdown()}
