"""Text and JSON renderings of a plan (the command line's output)."""
from __future__ import annotations

from collections import OrderedDict

from megatron_phi4.planner.memory import GIB
from megatron_phi4.planner.search import Candidate, PlanResult

MEM_COLUMNS = (("params", "parameters"), ("grads", "gradients"), ("optim", "optimizer"),
               ("gather", "gathered_parameters"), ("accum", "accumulated_gradients"),
               ("pipe", "pipeline_buffers"), ("act", "activations"), ("trans", "transient"), ("rsv", "reserve"))


def _layout_cells(c: Candidate, global_batch: int) -> list[str]:
    lay = c.layout
    shard = lay.dp_shard + ("+sync" if lay.sync_grads_every_microbatch else "")
    return [str(lay.tp), "y" if lay.sequence_parallel else "-", str(lay.pp), lay.schedule_name(), str(lay.dp),
            shard, str(lay.micro_batch), str(lay.microbatches(global_batch)), lay.recompute, lay.precision]


LAYOUT_HEAD = ["tp", "sp", "pp", "schedule", "dp", "shard", "mb", "m", "recompute", "prec"]


def _gib(x: int) -> str:
    return f"{x / GIB:.1f}"


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(cell.rjust(w) for cell, w in zip(r, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def candidate_rows(cands: list[Candidate], global_batch: int,
                   numbered: bool = True) -> tuple[list[list[str]], list[str]]:
    head = (["#"] if numbered else []) + LAYOUT_HEAD + [k for k, _ in MEM_COLUMNS] + [
        "GiB", "step s", "bubble", "dp exp", "Mtok/s", "MFU"]
    rows = []
    for i, c in enumerate(cands, 1):
        mem = [_gib(getattr(c.memory, k)) for _, k in MEM_COLUMNS] + [_gib(c.memory.total)]
        t = c.time
        tim = [f"{t.total:.2f}", f"{t.bubble / t.total:.0%}", f"{t.dp_exposed:.2f}", f"{t.tokens_per_s / 1e6:.2f}",
               f"{t.mfu:.0%}"]
        rows.append(([str(i)] if numbered else []) + _layout_cells(c, global_batch) + mem + tim)
    return rows, head


def render_text(result: PlanResult, *, model_name: str, gpus: int, seq_length: int, global_batch: int, hw,
                top: int = 10, show_infeasible: int = 12) -> str:
    lines = []
    nodes = -(-gpus // hw.gpus_per_node)
    where = f"{nodes} nodes x {hw.gpus_per_node}" if nodes > 1 else f"one node of {hw.gpus_per_node}"
    lines.append(f"{model_name} on {gpus} GPUs ({where}), {hw.gpu_memory_gib:g} GiB each; "
                 f"seq {seq_length}, global batch {global_batch} ({global_batch * seq_length / 1e6:.1f}M tokens/step)")
    lines.append(f"model of the machine: matmul {hw.matmul_tflops:g} TFLOP/s, attention "
                 f"{hw.attention_rate(seq_length):.0f}, HBM {hw.hbm_gb_per_s:g} GB/s, NVLink {hw.nvlink_gb_per_s:g} GB/s, "
                 f"IB {hw.ib_gb_per_s:g} GB/s per GPU, "
                 f"DP overlap {'on' if hw.overlap_dp else 'off'}; predictions, not measurements (docs/planner.md)")
    n_all = len(result.feasible) + len(result.infeasible)
    lines.append("")
    lines.append(f"Feasible layouts, fastest first ({len(result.feasible)} of {n_all} candidates; memory in GiB on the "
                 f"fullest GPU, DP rank 0):")
    if result.feasible:
        rows, head = candidate_rows(result.feasible[:top], global_batch)
        lines += _table(rows, head)
        best = result.feasible[0]
        lines.append("")
        lines.append(f"#1 in detail: {best.layout.short()}")
        pc = best.layout.to_parallel_config()
        lines.append(f"  recipe: parallel.tp={pc.tp} parallel.pp={pc.pp} parallel.sequence_parallel="
                     f"{str(pc.sequence_parallel).lower()} parallel.pp_schedule={pc.pp_schedule} "
                     f"parallel.virtual_stages={pc.virtual_stages} parallel.pp_head_cost={pc.pp_head_cost:g} "
                     f"parallel.pp_embedding_cost={pc.pp_embedding_cost:g} parallel.dp_shard={pc.dp_shard} "
                     f"parallel.recompute={pc.recompute} parallel.mixed_precision={pc.mixed_precision} "
                     f"data.micro_batch_size={best.layout.micro_batch}")
        if best.layout.sync_grads_every_microbatch:
            lines.append("  (needs ParallelEngine(..., sync_grads_every_microbatch=True): recipes do not expose it)")
        mem = best.memory
        lines.append(f"  memory on pipeline rank {mem.pp_rank} (in flight per chunk: {mem.in_flight}): "
                     + ", ".join(f"{k.replace('_', ' ')} {_gib(getattr(mem, k))}" for k in mem.COMPONENTS)
                     + f" = {_gib(mem.total)} GiB")
        acts = sorted(mem.activation_items.items(), key=lambda kv: -kv[1])
        shown = [f"{k} {_gib(v)}" for k, v in acts if v >= GIB // 20]
        if shown:
            lines.append("  activations: " + ", ".join(shown))
        t = best.time
        lines.append(f"  step {t.total:.3f} s = compute {t.compute:.3f} + TP comm {t.tp_comm:.3f} + PP p2p "
                     f"{t.pp_comm:.3f} + bubble {t.bubble:.3f} + exposed DP {t.dp_exposed:.3f} + optimizer "
                     f"{t.optimizer:.3f}; {t.tokens_per_s / 1e6:.2f}M tokens/s, MFU {t.mfu:.1%} "
                     f"(of {hw.peak_tflops:g} TFLOP/s)")
    else:
        lines.append("  none: see below why")
    if result.infeasible and show_infeasible:
        lines.append("")
        memory_fails = [c for c in result.infeasible if c.problems[0].startswith("memory")]
        if memory_fails:
            lines.append("Fastest layouts that do not fit in memory:")
            rows, head = candidate_rows(memory_fails[:min(5, show_infeasible)], global_batch, numbered=False)
            lines += _table(rows, head)
            lines.append("")
        groups: OrderedDict[str, list[Candidate]] = OrderedDict()
        for c in result.infeasible:
            for p in c.problems:
                key = p if not p.startswith("memory") else "memory"
                groups.setdefault(key, []).append(c)
        lines.append(f"Ruled out ({len(result.infeasible)} candidates; a candidate may fail several rules):")
        for i, (reason, cands) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
            if i >= show_infeasible:
                lines.append(f"  ... {len(groups) - i} more reasons (--show-infeasible N, or --json for every "
                             f"candidate)")
                break
            if reason == "memory":
                example = min(cands, key=lambda c: c.memory.total)
                lines.append(f"  {len(cands):6d} x memory, e.g. {example.layout.short()}: {example.problems[-1][8:]}")
            else:
                lines.append(f"  {len(cands):6d} x {reason}  (e.g. {cands[0].layout.short()})")
    return "\n".join(lines)


def render_json(result: PlanResult, *, model_name: str, gpus: int, seq_length: int, global_batch: int, hw,
                model_config: dict) -> dict:
    return {
        "query": {"model": model_name, "gpus": gpus, "seq_length": seq_length, "global_batch": global_batch},
        "model_config": model_config,
        "hardware": hw.as_dict(),
        "feasible": [c.as_dict() for c in result.feasible],
        "infeasible": [c.as_dict() for c in result.infeasible],
    }
