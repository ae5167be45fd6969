"""phi4-demo end to end, at the ``smoke`` preset's size (a few steps per stage, 16 held-out problems):
the real driver, the real torchrun launches on four processes (TP2 x PP2 x DP1), the real
post-training rounds (PTS, token-level DPO, sampling + rule judge, judge-guided DPO, evaluations).

Three runs in one work directory:
1. ``--stop-after pretrain``: data and pre-training only;
2. the whole demo: data and pre-training are reused, the rest runs; every stage ran on four
   processes with its layout, mid-training raised the RoPE base, the table has every row;
3. the same command again: everything is reused -- no launch, no training, no evaluation -- and the
   table is the same.

The smoke model is trained for a few steps and answers (almost) nothing right, so Pivotal Token
Search usually finds no pivotal token (no question has a success probability to split). The test then
supplies that round's pairs itself (reference solution vs. the same solution with a wrong answer)
so the token-level DPO stage still trains, and says so in its output; everything else is unchanged.
The PTS search itself is tested on a trained model in tests/demo/test_posttrain_e2e.py.
"""
import json
import re
import time
from pathlib import Path

import pytest

from megatron_phi4.fileio import atomic_write_json
from tests.distributed_utils import run_distributed

pytestmark = pytest.mark.torchrun
HANG_GUARD_S = 1800  # only against hangs; the three runs take a few minutes on two busy cores
LAYOUT_LINE = "parallel layout: world 4 = pp 2 x dp 1 x tp 2"


def _reference_pairs(questions, vocab):
    """One pair per question: the worked solution (chosen) against it with a wrong final answer."""
    from megatron_phi4.demo import arithmetic as A
    from megatron_phi4.tokenizer import get_tokenizer

    tok = get_tokenizer()
    pairs = []
    for q in questions:
        p = A.Problem(**q["meta"]["problem"])
        good = A.worked_solution(p)
        bad = good.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")
        ids = lambda text: vocab.to_trimmed(tok.encode(text)) + [vocab.im_end_id]  # noqa: E731
        pairs.append({"prompt_ids": q["prompt_ids"], "chosen_ids": ids(good), "rejected_ids": ids(bad),
                      "source": "test_reference"})
    return pairs


def _demo(rank, world, argv):
    """Run the driver in a forked process (no process group: the CLI's situation)."""
    from megatron_phi4.demo import posttrain_rounds as R
    from megatron_phi4.demo.pipeline import run_demo
    from megatron_phi4.demo.pipeline_settings import parse_args

    real_make_pairs, fallbacks = R._make_pairs, []

    def make_pairs(source, checkpoint, questions, round_dir, vocab, *args, **kwargs):
        try:
            return real_make_pairs(source, checkpoint, questions, round_dir, vocab, *args, **kwargs)
        except RuntimeError as e:
            if "produced no pairs" not in str(e):
                raise
            fallbacks.append(f"{round_dir.name} ({source}): {e}")
            pairs = _reference_pairs(questions, vocab)
            info = {"questions": len(questions), "pairs": len(pairs), "seconds": 0.0, "pivotal_tokens": 0,
                    "rollouts": 0, "test_fallback": True}
            R._write_jsonl(round_dir / "pairs.jsonl", pairs)
            atomic_write_json(round_dir / "pairs.info.json", info)
            return round_dir / "pairs.jsonl", info

    R._make_pairs = make_pairs
    lines = []
    t0 = time.time()
    res = run_demo(parse_args(argv), log=lambda m: (lines.append(m), print(m, flush=True)))
    return res.to_json(), res.to_markdown(), lines, fallbacks, time.time() - t0


def _run(argv):
    return run_distributed(_demo, 1, argv, timeout=HANG_GUARD_S, init_process_group=False)[0]


def _final_lines(lines):
    """The progress line that ends each step: '[demo] k/n stage: ...' that is not a 'starting' line
    nor a post-training detail line."""
    out = {}
    for m in lines:
        hit = re.match(r"\[demo\] (\d)/(\d) (\w+): (?!starting|\[posttrain\])(.*)", m)
        if hit:
            out[hit.group(3)] = (int(hit.group(1)), int(hit.group(2)), hit.group(4))
    return out


def test_demo_end_to_end_four_processes_and_rerun_reuses(tmp_path):
    work = tmp_path / "demo"
    base = ["--work-dir", str(work), "--preset", "smoke"]

    # 1. data + pre-training only
    res1, _, lines1, _, _ = _run(base + ["--stop-after", "pretrain"])
    assert [s["name"] for s in res1["stages"]] == ["data", "pretrain"]
    assert set(_final_lines(lines1)) == {"data", "pretrain"}
    assert not (work / "logs" / "midtrain.log").exists()
    pre_log = (work / "logs" / "pretrain.log").read_text()

    # 2. the whole demo: data and pre-training reused
    res2, md2, lines2, fallbacks, wall2 = _run(base)
    print(f"\nfull smoke demo: {wall2:.0f}s; PTS fallback: {fallbacks or 'not needed'}\n{md2}")
    final = _final_lines(lines2)
    assert list(final) == ["data", "pretrain", "midtrain", "sft", "posttrain"]
    assert all(k == i + 1 and n == 5 for i, (k, n, _) in enumerate(final.values())), final
    assert "reused" in final["pretrain"][2] and "reused" not in final["sft"][2]
    assert (work / "logs" / "pretrain.log").read_text() == pre_log  # not launched again
    for stage in ("pretrain", "midtrain", "sft"):
        log = (work / "logs" / f"{stage}.log").read_text()
        assert LAYOUT_LINE in log and f"=== stage {stage}:" in log, log[-3000:]
        assert "--nproc-per-node=4" in log
    assert "rope_theta 10000," in pre_log
    assert "rope_theta 250000," in (work / "logs" / "midtrain.log").read_text()
    assert "rope_theta 250000," in (work / "logs" / "sft.log").read_text()  # inherited

    rows = {s["name"]: s for s in res2["stages"]}
    assert list(rows) == ["data", "pretrain", "midtrain", "sft", "pts", "dpo1", "judge", "dpo2"]
    for name in ("pretrain", "midtrain", "sft"):
        assert rows[name]["layout"] == "tp2 pp2 dp1" and rows[name]["val_loss"] > 0
    for name in ("sft", "dpo1", "dpo2"):
        for mode in ("greedy", "sampled"):
            a = rows[name][mode]
            assert a["total"] == 16 and 0 <= a["low"] <= a["rate"] <= a["high"] <= 1, (name, mode, a)
    for name in ("dpo1", "dpo2"):
        assert rows[name]["steps"] == 2 and rows[name]["val_loss"] is not None
        assert Path(rows[name]["detail"]).is_dir()  # the round's final checkpoint
    assert all(s["wall_s"] is not None for s in res2["stages"])
    table = (work / "results.md").read_text()
    for name in rows:
        assert re.search(rf"^\| {name} \|", table, re.M), name
    assert "| **total** |" in table and md2.splitlines()[:12] == table.split("\n", 2)[2].splitlines()[:12]
    assert any((work / "train" / "tensorboard").iterdir())
    for name in ("dpo1", "dpo2"):  # the DPO rounds' curves too
        assert any(work.glob(f"posttrain/*/{name}/run/tensorboard/**/events.out.tfevents.*")), name
    assert json.loads((work / "results.json").read_text())["stages"] == res2["stages"]

    # 3. again: everything reused, nothing launched, trained or evaluated
    mtimes = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()
              and p.name not in ("results.md", "results.json", "state.json", "settings.json", "recipe.yaml")}
    res3, md3, lines3, _, wall3 = _run(base)
    assert all("reused" in text for _, _, text in _final_lines(lines3).values()), lines3
    assert not any("starting" in m for m in lines3)
    changed = [str(p) for p, t in mtimes.items() if not p.exists() or p.stat().st_mtime_ns != t]
    assert not changed, changed
    strip = lambda s: [{k: v for k, v in d.items() if k != "reused"} for d in s["stages"]]  # noqa: E731
    assert strip(res3) == strip(res2)
    assert md3.split("\n\n")[0] == md2.split("\n\n")[0]  # the same table
    print(f"re-run: {wall3:.0f}s")
