"""torch.distributed's environment from SLURM's, for ``srun python -m megatron_phi4.train``.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT to
every worker. Launched directly by ``srun`` (one task per GPU) there is no torchrun; SLURM's own
variables carry the same facts:

======================  =====================================================================
torch                   SLURM (set by srun in every task of a job step)
======================  =====================================================================
RANK                    SLURM_PROCID
WORLD_SIZE              SLURM_STEP_NUM_TASKS (else SLURM_NTASKS)
LOCAL_RANK              SLURM_LOCALID
LOCAL_WORLD_SIZE        tasks on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE
                        entry of this node (SLURM_NODEID), e.g. ``4(x2),2`` -> 4, 4, 2
MASTER_ADDR             first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST); rank 0
                        runs there because SLURM numbers tasks node by node
MASTER_PORT             20000 + SLURM_JOB_ID % 20000 (the same number on every task)
======================  =====================================================================

Only a job *step* counts: a batch script also carries SLURM_PROCID=0 (and SLURM_NTASKS of the
whole allocation), so without SLURM_STEP_ID (srun sets it, the batch shell does not) nothing is
translated -- a plain ``python -m megatron_phi4.train`` inside ``sbatch`` stays one process
instead of waiting for peers that never come. Anything already set wins (torchrun's variables,
or a MASTER_ADDR / MASTER_PORT exported by the batch script when node names do not resolve).

Host lists are expanded here rather than with ``scontrol show hostnames`` because containers
(pyxis/enroot) usually have no SLURM client tools; the syntax is SLURM's: comma-separated names
with bracketed ranges and lists, zero padding kept (``gpu[001-003,010],login1``).
"""
from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

__all__ = ["SlurmEnvError", "expand_hostlist", "expand_tasks_per_node", "torch_env_from_slurm",
           "apply_slurm_env"]

TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT_BASE = 20000


class SlurmEnvError(ValueError):
    """A SLURM variable has a value this module cannot interpret (the message names it)."""


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SlurmEnvError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_ranges(body: str, text: str) -> list[str]:
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise SlurmEnvError(f"bad range {item!r} in host list {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise SlurmEnvError(f"descending range {item!r} in host list {text!r}")
        width = len(lo)  # SLURM keeps the zero padding of the lower bound
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """``"gpu[001-002,010],login1"`` -> ``["gpu001", "gpu002", "gpu010", "login1"]`` (SLURM order)."""
    hosts: list[str] = []
    for part in _split_top(text.strip()):
        names = [""]
        for m in re.finditer(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            prefix, body = m.group(1), m.group(2)
            if not prefix and body is None:
                continue
            names = [n + prefix for n in names]
            if body is not None:
                names = [n + s for n in names for s in _expand_ranges(body, text)]
        hosts.extend(names)
    if not hosts:
        raise SlurmEnvError(f"empty host list {text!r}")
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """``"4(x2),2"`` -> ``[4, 4, 2]`` (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE)."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise SlurmEnvError(f"bad tasks-per-node entry {item!r} in {text!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _int(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise SlurmEnvError(f"{key}={env[key]!r} is not an integer") from None


def torch_env_from_slurm(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables a SLURM job step implies, minus those already set.

    Empty when ``env`` is not inside an srun job step, or when torchrun's RANK is present.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return {}  # the batch shell itself, not a task of an srun step
    ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if ntasks_key not in env:
        raise SlurmEnvError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is")
    out = {"RANK": str(_int(env, "SLURM_PROCID")), "WORLD_SIZE": str(_int(env, ntasks_key)),
           "LOCAL_RANK": str(_int(env, "SLURM_LOCALID")) if "SLURM_LOCALID" in env else "0"}
    per_node_key = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if k in env), None)
    if per_node_key is not None:
        per_node = expand_tasks_per_node(env[per_node_key])
        node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        if node >= len(per_node):
            raise SlurmEnvError(f"SLURM_NODEID={node} but {per_node_key}={env[per_node_key]!r} lists "
                                f"{len(per_node)} nodes")
        out["LOCAL_WORLD_SIZE"] = str(per_node[node])
    nodelist_key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if k in env), None)
    if nodelist_key is not None:
        out["MASTER_ADDR"] = expand_hostlist(env[nodelist_key])[0]
    elif int(out["WORLD_SIZE"]) == 1:
        out["MASTER_ADDR"] = "127.0.0.1"
    else:
        raise SlurmEnvError("SLURM_PROCID is set but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST names "
                            "the nodes; export MASTER_ADDR")
    if "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(DEFAULT_PORT_BASE + _int(env, "SLURM_JOB_ID") % 20000)
    rank, world = int(out["RANK"]), int(out["WORLD_SIZE"])
    if not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is outside {ntasks_key}={world}")
    return {k: v for k, v in out.items() if k not in env}


def apply_slurm_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Export :func:`torch_env_from_slurm` into ``env`` (default ``os.environ``); returns what it set."""
    env = os.environ if env is None else env
    new = torch_env_from_slurm(env)
    env.update(new)
    return new
