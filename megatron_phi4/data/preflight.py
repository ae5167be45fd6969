"""Preflight of a stage's data inputs: is everything its ``data`` section names there and readable?

A typo in the SFT path used to surface only after pre-training and mid-training had run; a bad
mixture path only once the process group was up. :func:`check_stage_data` answers before anything
starts -- the entry point calls it for every stage before creating a process group -- and it is
cheap: it reads the mixture YAMLs, the 34-byte headers of the ``.idx`` files (plus two numbers at
their ends to compute the size the ``.bin`` must have), ``stat`` s the rest and parses the first
record of each preference JSONL. It builds no index and loads no token data.

Every problem names the config field it comes from, and the file::

    stages.sft.data.paths[0]: runs/x/sft/train_tokens.idx does not exist
    stages.pretrain.data.mixture: mix.yaml: sources[1] (code).paths[0]: /d/code.bin is truncated ...

Kinds without inputs (``synthetic``) have nothing to check; a kind registered later can add its
check to :data:`CHECKS`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, List, Optional

__all__ = ["DataInputError", "check_stage_data", "check_recipe_data", "CHECKS"]


class DataInputError(ValueError):
    """Inputs named by the configuration are missing or unreadable. ``problems`` lists every one,
    each starting with the config field (``stages.sft.data.paths[0]: ...``)."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- files
def _readable_file(path: str) -> Optional[str]:
    """None if ``path`` is a readable regular file, else what is wrong with it."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"{path} cannot be read: {e.strerror or e}"
    return None


def _indexed(prefix: str) -> List[str]:
    """Problems of a ``PREFIX.bin``/``PREFIX.idx`` pair: both readable, a valid ``.idx`` header whose
    size matches, and a ``.bin`` of the size the index describes. Reads only the header and the
    last length/pointer (the arrays are memory-mapped, not loaded)."""
    from megatron_phi4.data.indexed import IndexedDatasetError, read_index
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    bad = _readable_file(idx) or _readable_file(bin_)  # one message per dataset
    if bad:
        return [bad]
    try:
        info = read_index(idx, validate=False)
        want = info.data_nbytes
    except IndexedDatasetError as e:
        return [str(e)]
    have = os.path.getsize(bin_)
    if have != want:
        return [f"{bin_} is {'truncated' if have < want else 'longer than its index'}: {have} "
                f"bytes, {idx} describes {want} (mismatched or incomplete pair)"]
    return []


def _as_list(paths) -> List[str]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [p for p in str(paths).split(",") if p]
    return [str(p) for p in paths]


def _fields(field: str, paths) -> List[tuple]:
    """``(field, path)`` per entry: ``field[i]`` for lists and comma-separated strings."""
    items = _as_list(paths)
    if isinstance(paths, (str, os.PathLike)) and len(items) == 1:
        return [(field, items[0])]
    return [(f"{field}[{i}]", p) for i, p in enumerate(items)]


# --------------------------------------------------------------------------- per kind
def _mixture(field: str, path: str) -> List[str]:
    from megatron_phi4.data.mixture import MixtureError, MixtureSpec
    bad = _readable_file(path)
    if bad:
        return [f"{field}: mixture spec {bad}"]
    try:
        spec = MixtureSpec.from_yaml(path)
    except MixtureError as e:
        return [f"{field}: {e}"]
    out = []
    for i, src in enumerate(spec.sources):
        for j, p in enumerate(src.paths):
            out += [f"{field}: {path}: sources[{i}] ({src.name}).paths[{j}]: {m}"
                    for m in _indexed(p.prefix)]
    return out


def _check_pretrain(data, base: str) -> List[str]:
    out = []
    for name in ("mixture", "validation"):
        path = getattr(data, name)
        if path:
            out += _mixture(f"{base}.{name}", str(path))
    return out


def _sft_prefix(field: str, prefix: str) -> List[str]:
    from megatron_phi4.data.indexed import read_index
    tok, mask = prefix + "_tokens", prefix + "_loss_mask"
    if not os.path.exists(tok + ".idx") and not os.path.exists(mask + ".idx"):
        return [f"{field}: {tok}.idx does not exist (an SFT prefix names the PREFIX_tokens and "
                "PREFIX_loss_mask datasets of preprocess_chat)"]
    out = [f"{field}: {m}" for m in _indexed(tok) + _indexed(mask)]
    if not out:
        nt = read_index(tok + ".idx", validate=False).sequence_count
        nm = read_index(mask + ".idx", validate=False).sequence_count
        if nt != nm:
            out.append(f"{field}: {tok} has {nt} conversations but {mask} has {nm}; rerun "
                       "preprocess_chat")
    return out


def _check_sft(data, base: str) -> List[str]:
    out = []
    for f, p in _fields(f"{base}.paths", data.paths):
        out += _sft_prefix(f, p)
    for f, p in _fields(f"{base}.validation", data.validation):
        out += _sft_prefix(f, p)
    return out


def _preference_path(field: str, path: str, vocab_size: int) -> List[str]:
    from megatron_phi4.data.preference import PreferenceDataError, validate_record
    if os.path.exists(path + "_prompt.idx"):
        out = [f"{field}: {m}" for part in ("_prompt", "_chosen", "_rejected", "_meta")
               for m in _indexed(path + part)]
        bad = _readable_file(path + "_sources.json")
        return out + ([f"{field}: {bad}"] if bad else [])
    if not os.path.exists(path):
        return [f"{field}: {path} does not exist (neither a JSONL file nor a binary prefix with "
                f"{path}_prompt.idx)"]
    bad = _readable_file(path)
    if bad:
        return [f"{field}: {bad}"]
    try:  # the first record, as a cheap check of the format (the trainer validates them all)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        return [f"{field}: {path}:{lineno}: invalid JSON: {e.msg}"]
                    validate_record(rec, f"{path}:{lineno}", vocab_size)
                    return []
    except UnicodeDecodeError as e:
        return [f"{field}: {path}: not UTF-8 text ({e.reason})"]
    except PreferenceDataError as e:
        return [f"{field}: {e}"]
    return [f"{field}: {path} holds no preference pairs"]


def _check_preference(data, base: str) -> List[str]:
    from megatron_phi4.tokenizer import PHI4_VOCAB_SIZE
    out = []
    for f, p in _fields(f"{base}.paths", data.paths) + _fields(f"{base}.validation",
                                                              data.validation):
        out += _preference_path(f, p, PHI4_VOCAB_SIZE)
    return out


def _check_cache_dir(data, base: str) -> List[str]:
    d = getattr(data, "cache_dir", None)
    if not d:
        return []
    probe = os.path.abspath(str(d))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return [f"{base}.cache_dir: {probe} is not a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"{base}.cache_dir: {d} cannot be created or written ({probe} is not writable)"]
    return []


# Per-kind checks ``fn(data_cfg, field_base) -> problems``; a kind without an entry has no inputs
# to check here (synthetic, or one registered without a check).
CHECKS: Dict[str, Callable[[object, str], List[str]]] = {
    "pretrain": _check_pretrain,
    "sft": _check_sft,
    "preference": _check_preference,
}


# --------------------------------------------------------------------------- entry points
def check_stage_data(stage_cfg, prefix: str = "data") -> List[str]:
    """Problems with the inputs ``stage_cfg``'s data section names (empty: all present and
    readable). ``stage_cfg``: a StageConfig (fields are then ``{prefix}.data.<name>``, e.g.
    ``prefix="stages.sft"``) or a DataConfig (fields ``{prefix}.<name>``). Builds nothing; see the
    module docstring for what is read."""
    data = getattr(stage_cfg, "data", None)
    base = f"{prefix}.data" if data is not None else prefix
    data = data if data is not None else stage_cfg
    check = CHECKS.get(data.kind)
    return (check(data, base) if check else []) + _check_cache_dir(data, base)


def check_recipe_data(recipe, stage_names: Optional[Iterable[str]] = None) -> List[str]:
    """:func:`check_stage_data` for every stage of ``recipe`` (or those named), as
    ``stages.<name>.data...``. Raise ``DataInputError(problems)`` on a non-empty result."""
    names = None if stage_names is None else set(stage_names)
    out: List[str] = []
    for stage in recipe.stages:
        if names is None or stage.name in names:
            out += check_stage_data(stage, f"stages.{stage.name}")
    return out
