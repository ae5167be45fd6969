"""The project's checkpoint format: layout, metadata, atomic writes, single-process model I/O.

Layout of one checkpoint directory::

    CKPT/
      meta.json   {"format": "megatron_phi4", "version": 1, "kind": "weights"|"train",
                   "model": {ModelConfig fields}, ...extra keys (stage, step, consumed_samples)}
      model/      torch.distributed.checkpoint (DCP) directory; keys are plain ``Phi4Model`` names
                  ("layers.0.attention.q_proj.weight") with GLOBAL (unsharded) shapes
      optim/ ...  written by the trainer (train checkpoints only)

    RUN_CHECKPOINT_ROOT/latest   text file: relative path of the newest complete checkpoint

Because the stored shapes are global, a checkpoint written by any TP/PP/DP layout loads under any
other layout, in one process (``load_model_weights`` / ``megatron_phi4.load_model``) or in the HF
exporter. A checkpoint directory becomes visible only when complete: writers build it under
``CKPT.tmp-XXXX`` and rename it into place (``save_model_weights`` here; the trainer does the same
for its distributed saves and uses ``atomic_write_text`` for ``latest``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from megatron_phi4.fileio import TMP_INFIX, atomic_write_text, fsync_dir  # noqa: F401 (re-exported)

FORMAT_NAME = "megatron_phi4"
FORMAT_VERSION = 1
META_FILE = "meta.json"
MODEL_DIR = "model"
OPTIM_DIR = "optim"
LATEST_FILE = "latest"
KINDS = ("weights", "train")


class CheckpointError(RuntimeError):
    """A path is not a usable checkpoint; the message names the path and what is wrong."""


# --------------------------------------------------------------------------- small file helpers
def make_temp_dir(final: str | os.PathLike) -> Path:
    """A fresh ``<final>.tmp-XXXX`` directory next to ``final`` (same filesystem, so renamable)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{final.name}{TMP_INFIX}", dir=final.parent))


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, overwrite: bool = False) -> None:
    """Rename the finished directory ``tmp`` to ``final``. With ``overwrite`` an existing ``final``
    is moved aside first and deleted only after the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    old = None
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{final} already exists; refusing to overwrite it (pass overwrite)")
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_atomically(final: str | os.PathLike, build: Callable[[Path], Any], overwrite: bool = False):
    """Run ``build(tmp_dir)`` then publish ``tmp_dir`` as ``final``; on any error nothing is left
    behind (the temporary directory is removed) and ``final`` is untouched."""
    final = Path(final)
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise CheckpointError(f"{final} already exists; refusing to overwrite it")
    tmp = make_temp_dir(final)
    try:
        result = build(tmp)
        publish_dir(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# --------------------------------------------------------------------------- meta.json
def _model_cfg_dict(model_cfg) -> dict:
    if dataclasses.is_dataclass(model_cfg):
        return dataclasses.asdict(model_cfg)
    if isinstance(model_cfg, dict):
        return dict(model_cfg)
    raise TypeError(f"model_cfg must be a ModelConfig or a dict, got {type(model_cfg).__name__}")


def write_meta(ckpt_dir: str | os.PathLike, model_cfg, kind: str = "weights", **extra) -> dict:
    """Write ``ckpt_dir/meta.json`` atomically; ``extra`` keys (stage, step, consumed_samples...)
    are stored at the top level. Returns the written dict."""
    if kind not in KINDS:
        raise ValueError(f"kind: got {kind!r}, allowed: {', '.join(map(repr, KINDS))}")
    clash = {"format", "version", "model", "kind"} & set(extra)
    if clash:
        raise ValueError(f"meta.json keys {sorted(clash)} are reserved")
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind,
            "model": _model_cfg_dict(model_cfg), **extra}
    atomic_write_text(Path(ckpt_dir) / META_FILE, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return meta


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """Read and check ``ckpt_dir/meta.json``; raise CheckpointError naming the problem."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_FILE
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint (no such directory)")
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint ({META_FILE} is missing)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} checkpoint (format is {got!r})")
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported by this "
                              f"code (it reads version {FORMAT_VERSION})")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path}: the 'model' section (the ModelConfig) is missing")
    return meta


def model_config_from_meta(meta: dict):
    """The ModelConfig stored in a checkpoint's meta (validated; unknown fields are an error).

    Its ``backend`` / ``fp8`` say how the model was trained; they are not required to be usable on
    this machine (checkpoint names are the same for every backend: a checkpoint trained with
    Transformer Engine on GPUs loads into the local backend anywhere, see ``api.load_model``)."""
    from megatron_phi4.config import ConfigError, ModelConfig, from_dict

    try:
        cfg = from_dict(ModelConfig, meta["model"], "model")
        cfg.validate("model", check_available=False)
    except ConfigError as e:
        raise CheckpointError(f"meta.json: invalid model config: {e}") from None
    return cfg


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from ``path``: either a checkpoint itself (has meta.json), or a run
    checkpoint root whose ``latest`` file names one (``<root>/checkpoints/latest`` is also tried)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or checkpoint root (the path does not exist)")
    if (path / META_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = root / LATEST_FILE
        if latest.is_file():
            rel = latest.read_text().strip()
            if not rel:
                raise CheckpointError(f"{latest} is empty; it should name the newest checkpoint")
            target = (root / rel) if not os.path.isabs(rel) else Path(rel)
            if not (target / META_FILE).is_file():
                raise CheckpointError(f"{latest} points to {target}, which is not a complete checkpoint "
                                      f"({META_FILE} is missing)")
            return target
    raise CheckpointError(f"{path}: not a checkpoint ({META_FILE} is missing) and not a checkpoint root "
                          f"(no '{LATEST_FILE}' file)")


# --------------------------------------------------------------------------- model weights via DCP
def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' whenever no process group exists: that is
    exactly what these helpers intend, so the warning is silenced here (and only here). DCP also
    wraps any error in a CheckpointException (a BaseException, which ``except Exception`` misses):
    in one process there is one underlying error, which is re-raised as itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        try:
            yield
        except CheckpointException as e:
            failures = list(e.failures.values())
            if len(failures) == 1 and isinstance(failures[0], tuple) and isinstance(failures[0][0], BaseException):
                raise failures[0][0] from e
            raise


class _LazySavePlanner:
    """Factory for a DCP save planner whose tensors are produced on demand.

    DCP plans from shapes and dtypes, then asks the planner for each tensor's data only when the
    writer reaches it (``resolve_data``). Planning runs on zero-memory placeholders, and each real
    tensor is created by ``producers[name]()`` right before it is written, so with one file per
    tensor (the writer keeps a file's tensors alive until the file is closed) at most one tensor is
    in memory at a time.
    """

    @staticmethod
    def create(producers: dict[str, Callable[[], torch.Tensor]]):
        from torch.distributed.checkpoint import DefaultSavePlanner

        class LazySavePlanner(DefaultSavePlanner):
            def resolve_data(self, write_item):
                fqn = write_item.index.fqn
                if fqn in producers:
                    tensor = producers[fqn]()
                    expected = tuple(write_item.tensor_data.size)
                    if tuple(tensor.shape) != expected:
                        raise CheckpointError(f"{fqn}: produced shape {tuple(tensor.shape)}, planned {expected}")
                    return tensor.detach().contiguous()
                return super().resolve_data(write_item)

        return LazySavePlanner()


def placeholder(shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of the given shape and dtype that owns one element (an expanded scalar)."""
    return torch.empty((), dtype=dtype).expand(*tuple(shape))


def save_model_weights(
    state_dict: dict[str, torch.Tensor | Callable[[], torch.Tensor]] | None,
    ckpt_dir: str | os.PathLike,
    model_cfg,
    *,
    lazy: dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]] | None = None,
    overwrite: bool = False,
    kind: str = "weights",
    **extra,
) -> Path:
    """Single-process save of a full (unsharded) model state dict as a project checkpoint.

    ``state_dict`` maps plain ``Phi4Model`` names to tensors. ``lazy`` maps names to
    ``(shape, dtype, producer)``: the producer is called only when DCP writes that tensor, so a
    converter can stream a model larger than memory. Written under ``ckpt_dir.tmp-XXXX`` and
    renamed to ``ckpt_dir`` when complete; on error nothing is left behind.
    """
    dcp = _dcp()
    state_dict = dict(state_dict or {})
    lazy = dict(lazy or {})
    both = set(state_dict) & set(lazy)
    if both:
        raise ValueError(f"tensors given both eagerly and lazily: {sorted(both)[:5]}")
    plan_sd: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if hasattr(t, "full_tensor"):  # a DTensor: single-process saves want the full tensor
            t = t.full_tensor()
        plan_sd[name] = t.detach().cpu()
    producers = {}
    for name, (shape, dtype, fn) in lazy.items():
        plan_sd[name] = placeholder(shape, dtype)
        producers[name] = fn

    def build(tmp: Path) -> None:
        writer = dcp.FileSystemWriter(str(tmp / MODEL_DIR), single_file_per_rank=False, sync_files=True)
        with _quiet_single_process():
            dcp.save(plan_sd, storage_writer=writer, planner=_LazySavePlanner.create(producers), no_dist=True)
        write_meta(tmp, model_cfg, kind=kind, **extra)

    write_atomically(ckpt_dir, build, overwrite=overwrite)
    return Path(ckpt_dir)


def _model_dir(ckpt_dir: str | os.PathLike) -> Path:
    model_dir = Path(ckpt_dir) / MODEL_DIR
    if not (model_dir / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir}: the model weights are missing ({MODEL_DIR}/.metadata not found)")
    return model_dir


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike) -> str:
    """A short hash identifying a checkpoint's weights: its model config and its ``model/`` DCP
    metadata (tensor names, shapes, dtypes and where each chunk lives). Two saves of the same
    weights may differ; a different checkpoint always does. Reads two small files."""
    import hashlib

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    h = hashlib.sha256(json.dumps(read_meta(ckpt_dir)["model"], sort_keys=True).encode())
    h.update((_model_dir(ckpt_dir) / ".metadata").read_bytes())
    return h.hexdigest()[:24]


def checkpoint_tensor_meta(ckpt_dir: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (global shape, stored dtype)} of every tensor in ``ckpt_dir/model`` (reads metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dcp = _dcp()
    md = dcp.FileSystemReader(str(_model_dir(ckpt_dir))).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def load_model_weights(
    ckpt_dir: str | os.PathLike,
    keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    *,
    tensor_meta: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Full (global-shape) tensors of a checkpoint, read in one process through DCP.

    ``keys`` limits the read to those tensors (only their bytes are read: the exporter streams
    layer by layer); None reads every tensor. ``dtype`` casts floating tensors; None keeps the
    stored dtype. ``tensor_meta`` (from ``checkpoint_tensor_meta``) saves re-reading metadata.
    ``ckpt_dir`` may also be a run root with ``latest``.
    """
    dcp = _dcp()
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    available = tensor_meta if tensor_meta is not None else checkpoint_tensor_meta(ckpt_dir)
    names = list(available) if keys is None else list(keys)
    missing = [k for k in names if k not in available]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint has no tensor(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    out = {k: torch.empty(available[k][0], dtype=available[k][1]) for k in names}
    if out:
        with _quiet_single_process():
            dcp.load(out, storage_reader=dcp.FileSystemReader(str(_model_dir(ckpt_dir))), no_dist=True)
    if dtype is not None:
        out = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}
    return out


def load_into(module: torch.nn.Module, ckpt_dir: str | os.PathLike, strict: bool = True) -> None:
    """Load a checkpoint's weights in place into ``module``'s (plain, single-process) tensors,
    casting to their dtype and device: no second copy of the model is built."""
    dcp = _dcp()
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    available = checkpoint_tensor_meta(ckpt_dir)
    sd = module.state_dict()
    missing = [k for k in sd if k not in available]
    if missing and strict:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint lacks tensors the model needs: {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    bad = [f"{k}: checkpoint {available[k][0]}, model {tuple(v.shape)}" for k, v in sd.items()
           if k in available and available[k][0] != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{ckpt_dir}: shape mismatch: {'; '.join(bad[:5])}")
    target = {k: v for k, v in sd.items() if k in available}
    with _quiet_single_process():
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(_model_dir(ckpt_dir))), no_dist=True)
