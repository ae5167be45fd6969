"""Preference pairs (DPO) kept as token ids end to end.

JSONL record (one per line)::

    {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...],
     "weight": 1.0,                 # optional, >= 0 (default 1)
     "ref_chosen_logp": -12.3,      # optional: reference-model sum log-prob of the completion
     "ref_rejected_logp": -15.1,    # optional (both or neither)
     "source": "pts"}               # optional free-form tag

Pivotal-token pairs have one-token completions. Binary form (cheap, for large sets): indexed
datasets ``PREFIX_prompt``, ``PREFIX_chosen``, ``PREFIX_rejected`` (int32) and ``PREFIX_meta``
(float64, 3 values per pair: weight, ref_chosen_logp, ref_rejected_logp; NaN = absent), plus
``PREFIX_sources.json`` (list of tags); see :func:`write_preference_binary`.

:func:`collate_preference` lays a batch of B pairs out as ``[chosen rows; rejected rows]``:
``input_ids``/``labels``/``loss_mask``/``position_ids`` ``(2B, L)``, rows ``i`` and ``B + i``
are pair ``i``; ``loss_mask`` is 1 exactly on labels that are completion tokens.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from megatron_phi4.tokenizer import PAD_ID, PHI4_VOCAB_SIZE as VOCAB_SIZE

__all__ = ["PreferenceDataError", "PreferenceDataset", "validate_record", "collate_preference",
           "write_preference_binary", "ref_logps_path", "write_ref_logps", "read_ref_logps"]

_KEYS = {"prompt_ids", "chosen_ids", "rejected_ids", "weight", "ref_chosen_logp",
         "ref_rejected_logp", "source"}


class PreferenceDataError(ValueError):
    """A preference record is invalid; the message names ``file:line`` and the field."""


def _ids(rec, key, where, vocab_size, allow_empty=False) -> np.ndarray:
    v = rec.get(key)
    if not isinstance(v, list):
        raise PreferenceDataError(f"{where}: {key}: expected a list of token ids, got "
                                  f"{type(v).__name__}")
    if not v and not allow_empty:
        raise PreferenceDataError(f"{where}: {key}: must not be empty")
    for j, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int):
            raise PreferenceDataError(f"{where}: {key}[{j}]: expected an int token id, got {x!r}")
        if not 0 <= x < vocab_size:
            raise PreferenceDataError(f"{where}: {key}[{j}]: token id {x} outside [0, {vocab_size})")
    return np.asarray(v, dtype=np.int32)


def _num(rec, key, where, default=None, nonneg=False):
    if key not in rec or rec[key] is None:
        return default
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PreferenceDataError(f"{where}: {key}: expected a finite number, got {v!r}")
    if nonneg and v < 0:
        raise PreferenceDataError(f"{where}: {key}: must be >= 0, got {v}")
    return float(v)


def validate_record(rec, where: str = "<record>", vocab_size: int = VOCAB_SIZE) -> dict:
    """Check one record; returns it normalized (numpy ids, floats, NaN for absent ref logps)."""
    if not isinstance(rec, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = set(rec) - _KEYS
    if unknown:
        raise PreferenceDataError(f"{where}: unknown field {sorted(unknown)[0]!r} "
                                  f"(allowed: {', '.join(sorted(_KEYS))})")
    out = {"prompt_ids": _ids(rec, "prompt_ids", where, vocab_size),
           "chosen_ids": _ids(rec, "chosen_ids", where, vocab_size),
           "rejected_ids": _ids(rec, "rejected_ids", where, vocab_size),
           "weight": _num(rec, "weight", where, 1.0, nonneg=True)}
    rc = _num(rec, "ref_chosen_logp", where)
    rr = _num(rec, "ref_rejected_logp", where)
    if (rc is None) != (rr is None):
        raise PreferenceDataError(f"{where}: ref_chosen_logp and ref_rejected_logp must be given "
                                  "together")
    out["ref_chosen_logp"] = float("nan") if rc is None else rc
    out["ref_rejected_logp"] = float("nan") if rr is None else rr
    src = rec.get("source")
    if src is not None and not isinstance(src, str):
        raise PreferenceDataError(f"{where}: source: expected a string, got {src!r}")
    out["source"] = src or ""
    return out


def _read_jsonl(path: str, vocab_size: int):
    recs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{where}: invalid JSON: {e.msg}") from None
            recs.append(validate_record(obj, where, vocab_size))
    return recs


def write_preference_binary(records, prefix: str) -> int:
    """Write records (dicts, or the path of a JSONL file) in the binary form; returns the count."""
    from megatron_phi4.data.indexed import IndexedDatasetWriter
    if isinstance(records, (str, os.PathLike)):
        records = _read_jsonl(str(records), VOCAB_SIZE)
    sources = []
    n = 0
    with IndexedDatasetWriter(prefix + "_prompt", np.int32) as wp, \
            IndexedDatasetWriter(prefix + "_chosen", np.int32) as wc, \
            IndexedDatasetWriter(prefix + "_rejected", np.int32) as wr, \
            IndexedDatasetWriter(prefix + "_meta", np.float64) as wm:
        for i, rec in enumerate(records):
            r = validate_record(rec, f"record {i}") if not isinstance(
                rec.get("prompt_ids"), np.ndarray) else rec
            wp.add_document(r["prompt_ids"])
            wc.add_document(r["chosen_ids"])
            wr.add_document(r["rejected_ids"])
            wm.add_document(np.array([r["weight"], r["ref_chosen_logp"], r["ref_rejected_logp"]]))
            sources.append(r["source"])
            n += 1
    tmp = prefix + "_sources.json.tmp"
    with open(tmp, "w") as f:
        json.dump(sources, f)
    os.replace(tmp, prefix + "_sources.json")
    return n


class _Binary:
    def __init__(self, prefix: str) -> None:
        from megatron_phi4.data.indexed import IndexedDataset
        self.p = IndexedDataset(prefix + "_prompt")
        self.c = IndexedDataset(prefix + "_chosen")
        self.r = IndexedDataset(prefix + "_rejected")
        self.m = IndexedDataset(prefix + "_meta")
        n = len(self.p)
        if not (len(self.c) == len(self.r) == len(self.m) == n):
            raise PreferenceDataError(f"{prefix}: prompt/chosen/rejected/meta datasets have "
                                      f"different pair counts")
        sp = prefix + "_sources.json"
        self.sources = json.load(open(sp)) if os.path.exists(sp) else [""] * n

    def __len__(self) -> int:
        return len(self.p)

    def __getitem__(self, i: int) -> dict:
        m = self.m[i]
        return {"prompt_ids": self.p[i], "chosen_ids": self.c[i], "rejected_ids": self.r[i],
                "weight": float(m[0]), "ref_chosen_logp": float(m[1]),
                "ref_rejected_logp": float(m[2]), "source": self.sources[i]}


# --------------------------------------------------------------------------- reference log-probs
def ref_logps_path(data_path: str) -> str:
    """Where precomputed reference log-probs of a preference file/prefix live: beside it."""
    return str(data_path) + ".ref_logps.npz"


def write_ref_logps(data_path: str, chosen: np.ndarray, rejected: np.ndarray, meta: dict) -> str:
    """Write ``chosen``/``rejected`` (one float per pair, in the file's pair order) and ``meta``
    (the reference model's fingerprint, sequence length, ...) beside ``data_path``, atomically."""
    out = ref_logps_path(data_path)
    tmp = out + f".tmp-{os.getpid()}.npz"
    np.savez(tmp, chosen=np.asarray(chosen, np.float64), rejected=np.asarray(rejected, np.float64),
             meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, out)
    return out


def read_ref_logps(data_path: str):
    """``(chosen, rejected, meta)`` from ``data_path``'s sidecar; PreferenceDataError if absent."""
    path = ref_logps_path(data_path)
    if not os.path.isfile(path):
        raise PreferenceDataError(f"{path}: no precomputed reference log-probs for {data_path} (run "
                                  f"tools/precompute_ref_logprobs.py, or use loss.dpo_reference: model)")
    with np.load(path) as z:
        return z["chosen"], z["rejected"], json.loads(str(z["meta"]))


class PreferenceDataset:
    """Pairs from JSONL files and/or binary prefixes (``PREFIX_prompt.idx`` present), validated
    on load (``file:line: field: reason``). ``ds[i]`` -> ``prompt_ids``/``chosen_ids``/
    ``rejected_ids`` (int64 tensors), ``weight``, ``ref_chosen_logp``, ``ref_rejected_logp``
    (float tensors, NaN when absent) and ``source`` (str).

    ``ref_logps=True``: the reference log-probs come from each path's sidecar
    (:func:`read_ref_logps`, written by tools/precompute_ref_logprobs.py), which must cover every
    pair; ``self.ref_meta`` lists each sidecar's metadata."""

    def __init__(self, paths: Union[str, Sequence[str]], vocab_size: int = VOCAB_SIZE,
                 ref_logps: bool = False) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.parts: List = []
        for p in map(str, paths):
            if os.path.exists(p + "_prompt.idx"):
                self.parts.append(_Binary(p))
            elif os.path.isfile(p):
                self.parts.append(_read_jsonl(p, vocab_size))
            else:
                raise PreferenceDataError(f"{p}: neither a JSONL file nor a binary prefix "
                                          f"({p}_prompt.idx)")
        self.offsets = np.cumsum([0] + [len(x) for x in self.parts])
        self.ref = None
        self.ref_meta: List[dict] = []
        if ref_logps:
            arrays = []
            for p, part in zip(map(str, paths), self.parts):
                chosen, rejected, meta = read_ref_logps(p)
                if len(chosen) != len(part) or len(rejected) != len(part):
                    raise PreferenceDataError(f"{ref_logps_path(p)}: {len(chosen)} reference log-probs for "
                                              f"{len(part)} pairs; recompute them")
                arrays.append(np.stack([chosen, rejected], axis=1))
                self.ref_meta.append({"path": p, **meta})
            self.ref = np.concatenate(arrays) if arrays else np.zeros((0, 2))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def record(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(f"pair {idx} out of range for {len(self)} pairs")
        f = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        rec = self.parts[f][idx - int(self.offsets[f])]
        if self.ref is not None:
            rec = {**rec, "ref_chosen_logp": float(self.ref[idx, 0]), "ref_rejected_logp": float(self.ref[idx, 1])}
        return rec

    def __getitem__(self, idx: int) -> dict:
        import torch
        r = self.record(int(idx))
        out = {k: torch.as_tensor(np.asarray(r[k], dtype=np.int64))
               for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for k in ("weight", "ref_chosen_logp", "ref_rejected_logp"):
            out[k] = torch.tensor(r[k], dtype=torch.float32)
        out["source"] = r["source"]
        return out


def collate_preference(pairs: Sequence[dict], pad_id: int = PAD_ID,
                       max_length: Optional[int] = None, pad_to_multiple_of: int = 1) -> Dict:
    """Batch B pairs for DPO as ``[chosen rows; rejected rows]`` (see module docstring).

    Row = prompt + completion; ``input_ids = row[:-1]``, ``labels = row[1:]``; right-padded with
    ``pad_id`` (loss_mask 0) to the longest row (or ``pad_to_multiple_of``). With ``max_length``
    (of ``input_ids``), rows longer than ``max_length + 1`` keep their completion (cut on the right
    only if it alone exceeds ``max_length``) and lose prompt tokens on the left; both rows of a pair
    keep the same prompt tokens. ``weight`` (B,) float32; ``ref_chosen_logp``/``ref_rejected_logp``
    (B,) only when every pair has them (a batch mixing both kinds is an error).
    """
    import torch
    B = len(pairs)
    if B == 0:
        raise ValueError("collate_preference: empty batch")

    def np_ids(x):
        return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.int64)

    rows, prompt_lens = [], []
    for kind in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            prompt, comp = np_ids(p["prompt_ids"]), np_ids(p[kind])
            if max_length is not None:
                c_max = max(len(np_ids(p["chosen_ids"])), len(np_ids(p["rejected_ids"])))
                comp = comp[:max_length]
                keep_prompt = max(1, max_length + 1 - min(c_max, max_length))
                prompt = prompt[-keep_prompt:]
            rows.append(np.concatenate([prompt, comp]))
            prompt_lens.append(len(prompt))
    L = max(len(r) for r in rows) - 1
    m = max(1, int(pad_to_multiple_of))
    L = -(-L // m) * m
    input_ids = torch.full((2 * B, L), pad_id, dtype=torch.long)
    labels = torch.full((2 * B, L), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((2 * B, L), dtype=torch.float32)
    for i, (r, pl) in enumerate(zip(rows, prompt_lens)):
        t = torch.from_numpy(r)
        n = len(r) - 1
        input_ids[i, :n] = t[:-1]
        labels[i, :n] = t[1:]
        loss_mask[i, pl - 1:n] = 1.0
    out = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
           "position_ids": torch.arange(L).expand(2 * B, L).contiguous()}

    def f(p, k):
        v = p.get(k, float("nan"))
        return float(v.item() if hasattr(v, "item") else v)

    out["weight"] = torch.tensor([f(p, "weight") if "weight" in p else 1.0 for p in pairs],
                                 dtype=torch.float32)
    ref = np.array([[f(p, "ref_chosen_logp"), f(p, "ref_rejected_logp")] for p in pairs])
    has = ~np.isnan(ref).any(axis=1)
    if has.all():
        out["ref_chosen_logp"] = torch.tensor(ref[:, 0], dtype=torch.float32)
        out["ref_rejected_logp"] = torch.tensor(ref[:, 1], dtype=torch.float32)
    elif has.any():
        raise ValueError("collate_preference: some pairs carry reference log-probs and some do "
                         "not; compute them for all pairs or none")
    return out
