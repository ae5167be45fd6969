"""Distributed (sharded) checkpoint I/O with resharding: every rank writes only what it owns, the files
describe GLOBAL tensors, and any layout (or one process) reads them back.

API (stable; the trainer calls these)::

    save_sharded(shards, dcp_dir, process_group=None, async_=False)
        shards: {name: (local_tensor, ShardInfo)} -- e.g. ``engine.local_shards()``. Collective over
        ``process_group`` (default: the world). Each rank contributes the rectangles whose
        ``ShardInfo.replicated`` is False; together they must tile every global tensor exactly
        (DCP's global plan check rejects gaps and overlaps). The result is a DCP directory whose
        keys are ``name`` with GLOBAL shapes: the ``model/`` layout of ``checkpoint/format.py``, so
        ``load_model_weights`` / ``megatron_phi4.load_model`` read it in one process.
        ``async_=True`` stages the tensors to CPU and returns a ``concurrent.futures.Future`` that
        completes when the files are written (see "Async" below). Returns None otherwise.

    load_sharded(targets, dcp_dir, process_group=None)
        targets: {name: (local_tensor, ShardInfo)}, filled IN PLACE (replicated copies too) from a
        checkpoint saved under any layout, or by the single-process ``save_model_weights``. DCP reads
        only the stored chunks that overlap each local rectangle. A name missing from the checkpoint
        or a global shape that differs raises ``CheckpointError`` on every rank (no hang), naming
        the key, the checkpoint directory and both shapes. Extra checkpoint keys are ignored.

    optimizer_shards(optimizer, engine) -> {name: (local_tensor, ShardInfo)}
        The optimizer state as shards: ``"{name}.exp_avg"``, ``"{name}.exp_avg_sq"`` (and
        ``"{name}.max_exp_avg_sq"`` with amsgrad) cut like the parameter (checkpoint names, so the
        state of a fused parameter is stored per named tensor), ``"{name}.step"`` as a 0-d tensor
        written by exactly one rank (the one holding the tensor's non-replicated rectangle at
        offset 0). The tensors are the live state: saving reads them, loading writes them.

    load_optimizer_shards(optimizer, engine, dcp_dir, process_group=None)
        Creates the (lazily created) Adam/AdamW state -- zeros and a step tensor, exactly as
        ``torch.optim`` would -- for every parameter that has none, then fills it from ``dcp_dir``
        with ``load_sharded``. The next ``optimizer.step()`` continues as if there had been no
        restart. Hyper-parameters (lr, betas, weight decay) are not stored: they come from the
        trainer's config and schedule. (``init_adam_state(optimizer)`` alone does the first half.)
        A checkpoint saved before the first ``optimizer.step()`` holds no optimizer state, so loading
        it raises (missing keys): save the optimizer only after a step.

Typical trainer use (inside its temporary checkpoint directory, published with ``publish_dir``)::

    save_sharded(engine.local_shards(), tmp / "model")
    save_sharded(optimizer_shards(opt, engine), tmp / "optim")
    ...
    load_sharded(engine.local_shards(), ckpt / "model")
    load_optimizer_shards(opt, engine, ckpt / "optim")

How: a custom DCP ``SavePlanner`` emits one SHARD write item per owned rectangle, with its global
offset and the global size, so DCP's metadata describes the global tensor as a list of chunks; a
custom ``LoadPlanner`` asks, per local rectangle, for the stored chunks that overlap it
(``create_read_items_for_chunk_list``) and copies each overlap into the matching sub-view of the
local tensor. No ShardedTensor/DTensor wrapping, no collective per tensor: one DCP save or load, whose
only collectives are the plan gather/scatter and a final barrier (gloo on CPU, NCCL on CUDA; tensors
may live on any device -- DCP copies them to and from CPU itself).

Async: ``torch.distributed.checkpoint.async_save`` needs a process group with a CPU backend (gloo, or
``"cpu:gloo,cuda:nccl"``). Its planning collectives run in a background thread, so pass a
*dedicated* gloo group (``dist.new_group(backend="gloo")``) if training collectives run on the same
group meanwhile; call ``future.result()`` before the next save and before publishing the checkpoint.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_phi4.checkpoint.format import CheckpointError
from megatron_phi4.distributed.sharding import ShardInfo

__all__ = ["save_sharded", "load_sharded", "optimizer_shards", "load_optimizer_shards", "init_adam_state",
           "ShardInfo", "CheckpointError"]

Shards = dict[str, tuple[torch.Tensor, ShardInfo]]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _check_rect(name: str, t: torch.Tensor, info: ShardInfo) -> None:
    """Raised inside the planners, so DCP reports it on every rank instead of leaving others waiting."""
    g, o = tuple(info.global_shape), tuple(info.global_offset)
    if len(g) != t.dim() or len(o) != t.dim():
        raise CheckpointError(f"{name}: local tensor has {t.dim()} dims but ShardInfo says global shape {g}, offset {o}")
    if any(off < 0 or off + n > size for off, n, size in zip(o, t.shape, g)):
        raise CheckpointError(f"{name}: local rectangle {tuple(t.shape)} at offset {o} does not fit global shape {g}")


# --------------------------------------------------------------------------- planners
def _save_planner_cls():
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class ShardSavePlanner(DefaultSavePlanner):
        """Writes each owned local rectangle as one chunk (global offset + global size) of its tensor."""

        def __init__(self, infos: dict[str, ShardInfo]):
            super().__init__()
            self._infos = infos

        def create_local_plan(self) -> SavePlan:
            items = []
            for name, t in self.state_dict.items():
                info = self._infos[name]
                _check_rect(name, t, info)
                if info.replicated or (t.numel() == 0 and t.dim() > 0):
                    continue  # another rank writes it / nothing to write
                offsets = torch.Size(info.global_offset)
                items.append(WriteItem(
                    index=MetadataIndex(name, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=t.size()),
                        properties=TensorProperties.create_from_tensor(t),
                        size=torch.Size(info.global_shape)),
                ))
            plan = SavePlan(items, planner_data=self.mappings if self.flatten_state_dict else None)
            self.plan = plan
            return plan

        def resolve_data(self, write_item):
            # The local tensor *is* the chunk (the default planner would look it up by offset 0).
            return self.state_dict[write_item.index.fqn].detach()

    return ShardSavePlanner


def _load_planner_cls():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ShardLoadPlanner(DefaultLoadPlanner):
        """Reads, for each local rectangle, the overlapping parts of the stored chunks."""

        def __init__(self, infos: dict[str, ShardInfo], where: str):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._infos, self._where = infos, where

        def create_local_plan(self) -> LoadPlan:
            stored = self.metadata.state_dict_metadata
            missing, bad, requests = [], [], []
            for name, t in self.state_dict.items():
                info = self._infos[name]
                md = stored.get(name)
                if md is None:
                    missing.append(name)
                    continue
                if not isinstance(md, TensorStorageMetadata):
                    bad.append(f"{name}: stored as a non-tensor object, expected a tensor of shape "
                               f"{tuple(info.global_shape)}")
                    continue
                if tuple(md.size) != tuple(info.global_shape):
                    bad.append(f"{name}: checkpoint has global shape {tuple(md.size)}, "
                               f"the model expects {tuple(info.global_shape)}")
                    continue
                _check_rect(name, t, info)
                if t.numel() == 0 and t.dim() > 0:
                    continue
                chunk = ChunkStorageMetadata(offsets=torch.Size(info.global_offset), sizes=t.size())
                requests += create_read_items_for_chunk_list(name, md, [chunk])
            if missing or bad:
                parts = []
                if missing:
                    parts.append(f"missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
                if bad:
                    parts.append("shape mismatch: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
                raise CheckpointError(f"{self._where}: " + "; ".join(parts))
            return LoadPlan(requests)

        def lookup_tensor(self, index):
            # The local tensor holds exactly its rectangle; read items carry offsets relative to it.
            return self.state_dict[index.fqn]

    return ShardLoadPlanner


# --------------------------------------------------------------------------- error handling
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _raise_clean(e: BaseException) -> None:
    """DCP gathers every rank's failure into one CheckpointException (a BaseException). If the
    failures are our own CheckpointErrors (bad keys/shapes), raise one CheckpointError with their
    distinct messages on every rank; otherwise re-raise a RuntimeError carrying DCP's report."""
    failures = getattr(e, "failures", {}) or {}
    excs = []
    for f in failures.values():
        exc = f[0] if isinstance(f, tuple) else f
        if isinstance(exc, BaseException):
            excs.append(exc)
    if excs and all(isinstance(x, CheckpointError) for x in excs):
        msgs = list(dict.fromkeys(str(x) for x in excs))
        raise CheckpointError("\n".join(msgs)) from None
    if len(excs) == 1 and isinstance(excs[0], (ValueError, TypeError, RuntimeError)):
        raise excs[0] from e
    raise RuntimeError(f"distributed checkpoint failed: {e}") from e


class _DCPErrors:
    def __init__(self, single: bool):
        self.single = single

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        if self.single:
            warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        return self

    def __exit__(self, typ, val, tb):
        self._w.__exit__(typ, val, tb)
        from torch.distributed.checkpoint.api import CheckpointException

        if isinstance(val, CheckpointException):
            _raise_clean(val)
        return False


# --------------------------------------------------------------------------- save / load
def save_sharded(shards: Shards, dcp_dir: str | os.PathLike, process_group=None, *,
                 async_: bool = False) -> Future | None:
    """Collective DCP save of every rank's non-replicated rectangles as GLOBAL tensors (see module doc).

    Every rank of ``process_group`` must call it (a rank with nothing to write passes {}).
    ``dcp_dir`` is written directly (one ``__<rank>_*.distcp`` file per rank + ``.metadata``); make it
    part of a temporary checkpoint directory and publish that when complete.
    """
    import torch.distributed.checkpoint as dcp

    infos, state = {}, {}
    for name, (t, info) in shards.items():
        if not isinstance(t, torch.Tensor) or hasattr(t, "to_local"):
            raise TypeError(f"{name}: expected a plain local tensor (call .to_local() on DTensors), "
                            f"got {type(t).__name__}")
        infos[name], state[name] = info, t.detach()
    single = not _distributed()
    writer = dcp.FileSystemWriter(str(dcp_dir), single_file_per_rank=True, sync_files=True)
    planner = _save_planner_cls()(infos)
    with _DCPErrors(single):
        if async_:
            fut = dcp.async_save(state, storage_writer=writer, planner=planner, process_group=process_group,
                                 no_dist=single)
            return _wrap_future(fut)
        dcp.save(state, storage_writer=writer, planner=planner, process_group=process_group, no_dist=single)
    return None


def _wrap_future(fut) -> Future:
    """A Future that completes like DCP's, but with our clean errors."""
    if not isinstance(fut, Future):  # AsyncSaveResponse (newer API): wait on its upload future
        fut = getattr(fut, "upload_completion", fut)
    out: Future = Future()

    def done(f):
        try:
            out.set_result(f.result())
        except BaseException as e:  # noqa: BLE001 -- CheckpointException is a BaseException
            try:
                if hasattr(e, "failures"):
                    _raise_clean(e)
                raise
            except BaseException as clean:  # noqa: BLE001
                out.set_exception(clean)

    fut.add_done_callback(done)
    return out


def load_sharded(targets: Shards, dcp_dir: str | os.PathLike, process_group=None) -> None:
    """Fill every rank's local rectangles in place from ``dcp_dir`` (saved under any layout; see
    module doc). Collective over ``process_group``."""
    import torch.distributed.checkpoint as dcp

    dcp_dir = Path(dcp_dir)
    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointError(f"{dcp_dir}: not a DCP checkpoint directory (.metadata not found)")
    infos, state = {}, {}
    for name, (t, info) in targets.items():
        if not isinstance(t, torch.Tensor) or hasattr(t, "to_local"):
            raise TypeError(f"{name}: expected a plain local tensor (call .to_local() on DTensors), "
                            f"got {type(t).__name__}")
        infos[name], state[name] = info, t.detach()
    single = not _distributed()
    planner = _load_planner_cls()(infos, str(dcp_dir))
    with _DCPErrors(single):
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(dcp_dir)), planner=planner,
                 process_group=process_group, no_dist=single)


# --------------------------------------------------------------------------- optimizer state
def optimizer_shards(optimizer: torch.optim.Optimizer, sharded) -> Shards:
    """The optimizer's per-parameter state as ``{f"{name}.{key}": (local view, ShardInfo)}`` with
    checkpoint names (see module doc). ``sharded``: the engine, or any object with
    ``named_parameters()`` (local names) and ``shard_views(tensors, suffix)`` (local name ->
    checkpoint-named views with their rectangles). A state tensor shaped like its parameter is cut
    exactly like it (a fused parameter's moments into the same named pieces); a scalar (``step``) is
    stored once per checkpoint name, by the rank holding that tensor's non-replicated rectangle at
    offset 0. Parameters without state (never stepped) contribute nothing."""
    names = {id(p): n for n, p in sharded.named_parameters()}
    out: Shards = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            loc_p = _local(p)
            fqn = names.get(id(p))
            if fqn is None:
                raise KeyError(f"optimizer_shards: an optimizer parameter of shape {tuple(loc_p.shape)} is not "
                               "among the engine's parameters (build the optimizer over engine.parameters())")
            param_views = sharded.shard_views({fqn: p.detach()})
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer_shards: state {fqn}.{key} is a {type(value).__name__}, not a tensor")
                loc = _local(value).detach()
                if loc.dim() == 0:  # step: same on every rank; one writer per checkpoint name
                    for name, (view, info) in param_views.items():
                        writer = (not info.replicated and all(o == 0 for o in info.global_offset)
                                  and view.numel() > 0)
                        out[f"{name}.{key}"] = (loc, ShardInfo((), (), not writer))
                elif tuple(loc.shape) == tuple(loc_p.shape):
                    out.update(sharded.shard_views({fqn: value.detach()}, suffix=f".{key}"))
                else:
                    raise ValueError(f"optimizer_shards: state {fqn}.{key} has shape {tuple(loc.shape)}, neither "
                                     f"a scalar nor the parameter's local shape {tuple(loc_p.shape)}")
    return out


def _scalar_dtype(fused: bool) -> torch.dtype:
    # torch.optim.adam's rule: float32 steps unless the default dtype is float64 (and never for fused)
    return torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64


@torch.no_grad()
def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the Adam/AdamW state ``optimizer.step()`` would create on its first call (zeros, step 0)
    for every parameter that has none; existing state is left alone."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise NotImplementedError(f"load_optimizer_shards initializes Adam/AdamW state only, got "
                                  f"{type(optimizer).__name__}; create its state before loading")
    for group in optimizer.param_groups:
        fused, capturable = bool(group.get("fused")), bool(group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state[p]
            if len(state):
                continue
            state["step"] = (torch.zeros((), dtype=_scalar_dtype(fused), device=p.device) if fused or capturable
                             else torch.tensor(0.0, dtype=_scalar_dtype(fused)))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_optimizer_shards(optimizer: torch.optim.Optimizer, engine, dcp_dir: str | os.PathLike,
                          process_group=None) -> None:
    """Create (if needed) and fill the optimizer state of this rank's parameters from ``dcp_dir``
    (written by ``save_sharded(optimizer_shards(...))`` under any layout). Collective."""
    init_adam_state(optimizer)
    load_sharded(optimizer_shards(optimizer, engine), dcp_dir, process_group)
