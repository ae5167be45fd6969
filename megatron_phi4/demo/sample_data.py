"""Small but real training data built on any machine, offline, in seconds.

:func:`prepare_sample_data` writes, under ``out_dir`` (idempotent: a complete directory is reused;
atomic: built in a temporary sibling and renamed into place under a file lock):

* pre-training text from sources every Python install has, as three mixture sources
  (``code``: the standard library's top-level ``.py`` files; ``docs``: docstrings of the standard
  library's modules, classes and functions; ``synthetic``: generated counting/arithmetic/sorting
  lessons), tokenized with :func:`megatron_phi4.data.preprocess.preprocess` (``--append-eod``)
  into indexed datasets, plus mixture YAMLs:

  - ``pretrain_mixture`` / ``pretrain_validation`` (held-out files: ``crc32(file name) % 8 == 0``;
    held-out docstrings from those files; lessons from another seed),
  - ``midtrain_mixture`` / ``midtrain_validation``: long documents (standard-library files
    concatenated into documents of more than :data:`LONG_DOCUMENT_TOKENS` tokens, filtered with
    ``min_document_tokens``) mixed with the short sources;

* SFT chat data (``sft`` / ``sft_validation`` prefixes from
  :func:`megatron_phi4.data.preprocess_chat.preprocess_chat`): arithmetic questions with a system
  prompt, answered ``"a + b = c."``;
* preference JSONL (token ids, :class:`Phi4Tokenizer`): ``dpo1`` pivotal-token pairs (prompt = the
  chat prompt and the answer up to the result, chosen = the correct result token, rejected = a
  wrong number token) and ``dpo2`` full-response pairs (correct vs wrong answer, ``weight`` = a
  fake judge score); each with a ``_validation`` file.

``paths["manifest"]`` is a JSON file with the token counts and the unigram entropy
(:func:`unigram_entropy`) of the pre-training validation tokens.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import random
import shutil
import sysconfig
import uuid
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from megatron_phi4.data.cache import file_lock

__all__ = ["prepare_sample_data", "sample_data_ready", "wait_for_sample_data", "unigram_entropy", "SAMPLE_DATA_VERSION", "LONG_DOCUMENT_TOKENS",
           "SYSTEM_PROMPT"]

SAMPLE_DATA_VERSION = 1
LONG_DOCUMENT_TOKENS = 2048
SYSTEM_PROMPT = "You are a careful arithmetic tutor. Answer with the equation and its result."
_CODE_BYTES = 2_600_000       # training code text budget (~0.8M tokens)
_DOCS_BYTES = 1_000_000       # training docstring budget
_LESSONS = 1500               # synthetic lesson documents (train)
_SFT_TRAIN, _SFT_VALID = 2000, 200
_DPO_TRAIN, _DPO_VALID = 1000, 100


# --------------------------------------------------------------------------- text sources
def _stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    return [f for f in files if os.path.getsize(f) > 0]


def _is_validation(path: str) -> bool:
    return zlib.crc32(os.path.basename(path).encode()) % 8 == 0


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def _docstrings(text: str) -> List[str]:
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for odd escapes in old files
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) >= 40:
                name = getattr(node, "name", "module")
                out.append(f"{name}\n\n{d}")
    return out


def _lesson(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        start, step = rng.randrange(0, 50), rng.randrange(1, 10)
        seq = [str(start + i * step) for i in range(rng.randrange(8, 20))]
        return f"Counting lesson: count from {start} in steps of {step}.\n" + ", ".join(seq) + "."
    if kind == 1:
        a = rng.randrange(2, 13)
        rows = [f"{a} x {b} = {a * b}" for b in range(1, 13)]
        return f"Multiplication table of {a}:\n" + "\n".join(rows)
    if kind == 2:
        lines = []
        for _ in range(rng.randrange(5, 12)):
            x, y = rng.randrange(0, 500), rng.randrange(0, 500)
            lines.append(f"{x} + {y} = {x + y}")
        return "Addition practice:\n" + "\n".join(lines)
    xs = [rng.randrange(0, 100) for _ in range(rng.randrange(5, 12))]
    return (f"Sorting lesson: the numbers {', '.join(map(str, xs))} in increasing order are "
            f"{', '.join(map(str, sorted(xs)))}. The smallest is {min(xs)} and the largest is "
            f"{max(xs)}.")


def _write_jsonl(path: str, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- chat / preference
def _question(rng: random.Random):
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randrange(2, 30), rng.randrange(2, 30)
        c = a * b
    elif op == "-":
        a = rng.randrange(10, 999)
        b = rng.randrange(0, a)
        c = a - b
    else:
        a, b = rng.randrange(0, 500), rng.randrange(0, 499)
        c = a + b
    return a, op, b, c


def _messages(a, op, b, answer):
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"What is {a} {op} {b}?"},
            {"role": "assistant", "content": f"{a} {op} {b} = {answer}."}]


def _wrong(rng: random.Random, c: int) -> int:
    while True:
        w = c + rng.choice([-1, 1]) * rng.randrange(1, 20)
        if 0 <= w < 1000 and w != c:
            return w


def _pts_pairs(tok, n: int, seed: int) -> List[dict]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, op, b, c = _question(rng)
        msgs = _messages(a, op, b, c)
        prompt = tok.apply_chat_template(msgs[:2], add_generation_prompt=True)
        partial = tok.encode(f"{a} {op} {b} = ")
        full = tok.encode(msgs[2]["content"])
        good = tok.encode(str(c))
        w = _wrong(rng, c)
        bad = tok.encode(str(w))
        # the result must be one token right after the partial answer (true below 1000 in cl100k)
        if full[:len(partial)] != partial or len(good) != 1 or len(bad) != 1 \
                or full[len(partial)] != good[0] or good[0] == bad[0]:
            continue
        out.append({"prompt_ids": prompt + partial, "chosen_ids": good, "rejected_ids": bad,
                    "weight": 1.0, "source": "pts"})
    return out


def _response_pairs(tok, n: int, seed: int) -> List[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, op, b, c = _question(rng)
        w = _wrong(rng, c)
        msgs = _messages(a, op, b, c)
        prompt = tok.apply_chat_template(msgs[:2], add_generation_prompt=True)
        chosen = tok.encode(f"{a} {op} {b} = {c}.") + [tok.im_end_id]
        rejected = tok.encode(f"{a} {op} {b} = {w}.") + [tok.im_end_id]
        # fake judge: confidence grows with how wrong the rejected answer is
        score = round(0.5 + 0.5 * min(1.0, abs(w - c) / 10.0), 4)
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                    "weight": score, "source": "judge"})
    return out


# --------------------------------------------------------------------------- entropy
def _all_tokens(prefix: str) -> np.ndarray:
    from megatron_phi4.data.indexed import IndexedDataset
    ds = IndexedDataset(prefix)
    parts = ds[0:len(ds)]
    return np.concatenate(parts).astype(np.int64) if len(parts) else np.zeros(0, np.int64)


def unigram_entropy(prefixes: Union[str, Sequence[str]], vocab_size: int = 100352) -> float:
    """Entropy (nats/token) of the unigram distribution of tokens: the loss of the best model that
    ignores context -- a trained model's validation loss should be well below it.

    ``prefixes``: indexed-dataset prefixes (tokens pooled), or the path of a mixture YAML (each
    source's unigram distribution weighted by its normalized mixture weight, as the blended
    validation stream samples them).
    """
    if isinstance(prefixes, (str, os.PathLike)) and str(prefixes).endswith((".yaml", ".yml")):
        from megatron_phi4.data.mixture import MixtureSpec
        spec = MixtureSpec.from_yaml(str(prefixes))
        p = np.zeros(vocab_size, np.float64)
        for src, w in zip(spec.sources, spec.normalized_weights()):
            counts = np.zeros(vocab_size, np.float64)
            for pre in src.prefixes:
                counts += np.bincount(_all_tokens(pre), minlength=vocab_size)[:vocab_size]
            if counts.sum() > 0:
                p += w * counts / counts.sum()
    else:
        if isinstance(prefixes, (str, os.PathLike)):
            prefixes = [str(prefixes)]
        p = np.zeros(vocab_size, np.float64)
        for pre in prefixes:
            p += np.bincount(_all_tokens(pre), minlength=vocab_size)[:vocab_size]
        if p.sum() == 0:
            raise ValueError(f"unigram_entropy: no tokens in {list(prefixes)}")
        p /= p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


# --------------------------------------------------------------------------- build
def _paths(root: str) -> Dict[str, str]:
    j = lambda *a: os.path.join(root, *a)  # noqa: E731
    return {
        "root": root,
        "manifest": j("manifest.json"),
        "pretrain_mixture": j("pretrain.yaml"),
        "pretrain_validation": j("pretrain_validation.yaml"),
        "midtrain_mixture": j("midtrain.yaml"),
        "midtrain_validation": j("midtrain_validation.yaml"),
        "sft": j("sft", "train"),
        "sft_validation": j("sft", "valid"),
        "dpo1": j("dpo", "round1_pts.jsonl"),
        "dpo1_validation": j("dpo", "round1_pts_valid.jsonl"),
        "dpo2": j("dpo", "round2_judge.jsonl"),
        "dpo2_validation": j("dpo", "round2_judge_valid.jsonl"),
    }


def _complete(root: str) -> bool:
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            return json.load(f).get("version") == SAMPLE_DATA_VERSION
    except (OSError, ValueError):
        return False


def sample_data_ready(out_dir: str) -> bool:
    """Whether ``out_dir`` holds complete sample data of this version (its manifest is written
    last, and the directory appears by an atomic rename, so a present manifest means complete)."""
    return _complete(os.path.abspath(str(out_dir)))


def wait_for_sample_data(out_dir: str, timeout_s: float = 1800.0, poll_s: float = 0.5
                         ) -> Dict[str, str]:
    """Block until another process has finished :func:`prepare_sample_data` for ``out_dir``;
    returns its paths. For the ranks that do not prepare it themselves (the entry point lets one
    process per node build and the others wait here); polling needs no lock, so it works where
    ``flock`` is not honoured. Raises ``TimeoutError`` after ``timeout_s``."""
    import time
    root = os.path.abspath(str(out_dir))
    deadline = time.monotonic() + timeout_s
    while not _complete(root):
        if time.monotonic() > deadline:
            raise TimeoutError(f"sample data {root}: not complete after {timeout_s:.0f} s; the "
                               "process preparing it (local rank 0) may have failed")
        time.sleep(poll_s)
    return _paths(root)


def prepare_sample_data(out_dir: str, tokenizer=None) -> Dict[str, str]:
    """Build (or reuse) the sample data under ``out_dir``; returns the paths (see module doc):
    ``root, manifest, pretrain_mixture, pretrain_validation, midtrain_mixture,
    midtrain_validation`` (mixture YAMLs), ``sft, sft_validation`` (preprocess_chat prefixes),
    ``dpo1, dpo1_validation, dpo2, dpo2_validation`` (preference JSONL files)."""
    root = os.path.abspath(str(out_dir))
    paths = _paths(root)
    if _complete(root):
        return paths
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    with file_lock(root + ".lock"):
        if _complete(root):
            return paths
        tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, tokenizer)
            if _complete(root):
                return paths  # built meanwhile by a process the lock did not exclude (e.g. NFS)
            if os.path.exists(root):
                shutil.rmtree(root)  # an incomplete leftover (no valid manifest)
            os.rename(tmp, root)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _build(root: str, tokenizer=None) -> None:
    from megatron_phi4.data.preprocess import preprocess
    from megatron_phi4.data.preprocess_chat import preprocess_chat
    from megatron_phi4.tokenizer import Phi4Tokenizer
    tok = tokenizer or Phi4Tokenizer()
    raw, bins = os.path.join(root, "raw"), os.path.join(root, "bin")
    for d in (raw, bins, os.path.join(root, "sft"), os.path.join(root, "dpo")):
        os.makedirs(d, exist_ok=True)

    # ---- text
    texts = {"train": [], "valid": []}
    for f in _stdlib_files():
        t = _read(f)
        if t is not None:
            texts["valid" if _is_validation(f) else "train"].append((os.path.basename(f), t))
    docs: Dict[str, Dict[str, List[str]]] = {s: {"train": [], "valid": []}
                                              for s in ("code", "docs", "synthetic", "long")}
    budget = {"code": _CODE_BYTES, "docs": _DOCS_BYTES}
    for split in ("train", "valid"):
        used = {"code": 0, "docs": 0}
        for name, t in texts[split]:
            if split == "valid" or used["code"] < budget["code"]:
                docs["code"][split].append(f"# file: {name}\n{t}")
                used["code"] += len(t)
            for d in _docstrings(t):
                if split == "valid" or used["docs"] < budget["docs"]:
                    docs["docs"][split].append(d)
                    used["docs"] += len(d)
        # long documents: consecutive files concatenated to > LONG_DOCUMENT_TOKENS tokens
        cur, cur_len = [], 0
        for name, t in texts[split]:
            cur.append(f"# file: {name}\n{t}")
            cur_len += len(t)
            if cur_len > 6 * LONG_DOCUMENT_TOKENS:  # ~3-4 bytes per token: safely above
                docs["long"][split].append("\n\n".join(cur))
                cur, cur_len = [], 0
    # keep the long training set small: about the code budget
    acc, kept = 0, []
    for d in docs["long"]["train"]:
        if acc >= _CODE_BYTES:
            break
        kept.append(d)
        acc += len(d)
    docs["long"]["train"] = kept
    for split, seed, n in (("train", 1, _LESSONS), ("valid", 2, _LESSONS // 8)):
        rng = random.Random(seed)
        docs["synthetic"][split] = ["\n\n".join(_lesson(rng) for _ in range(4)) for _ in range(n)]

    prefixes: Dict[str, Dict[str, str]] = {}
    tokens: Dict[str, Dict[str, int]] = {}
    for src, by_split in docs.items():
        for split, items in by_split.items():
            jl = os.path.join(raw, f"{src}_{split}.jsonl")
            _write_jsonl(jl, ({"text": t} for t in items))
            res = preprocess([jl], os.path.join(bins, f"{src}_{split}"), append_eod=True,
                             tokenizer=tok, quiet=True)
            prefixes.setdefault(src, {})[split] = res.output_prefixes[0]
            tokens.setdefault(src, {})[split] = int(sum(res.tokens))

    def rel(p: str) -> str:
        return os.path.relpath(p, root)

    def mix(name: str, split: str, weights: Dict[str, float], mdt: Optional[Dict[str, int]] = None):
        sources = []
        for s, w in weights.items():
            e = {"name": s, "weight": w, "paths": [rel(prefixes[s][split])]}
            if mdt and s in mdt:
                e["min_document_tokens"] = mdt[s]
            sources.append(e)
        with open(os.path.join(root, name), "w") as f:
            yaml_dump({"description": f"sample data ({split})", "sources": sources}, f)

    short = {"code": 0.5, "docs": 0.3, "synthetic": 0.2}
    mix("pretrain.yaml", "train", short)
    mix("pretrain_validation.yaml", "valid", short)
    mid = {"long": 0.6, "code": 0.2, "docs": 0.1, "synthetic": 0.1}
    mix("midtrain.yaml", "train", mid, {"long": LONG_DOCUMENT_TOKENS})
    with open(os.path.join(root, "midtrain_validation.yaml"), "w") as f:
        yaml_dump({"description": "sample data: held-out long documents", "sources": [
            {"name": "long", "weight": 1.0, "min_document_tokens": LONG_DOCUMENT_TOKENS,
             "paths": [rel(prefixes["long"]["valid"])]}]}, f)

    # ---- SFT chat
    for split, seed, n in (("train", 11, _SFT_TRAIN), ("valid", 12, _SFT_VALID)):
        rng = random.Random(seed)
        jl = os.path.join(raw, f"sft_{split}.jsonl")
        _write_jsonl(jl, ({"messages": _messages(a, op, b, c)}
                          for a, op, b, c in (_question(rng) for _ in range(n))))
        preprocess_chat([jl], os.path.join(root, "sft", split), tokenizer=tok, quiet=True)

    # ---- preference
    p = _paths(root)
    _write_jsonl(p["dpo1"], _pts_pairs(tok, _DPO_TRAIN, 21))
    _write_jsonl(p["dpo1_validation"], _pts_pairs(tok, _DPO_VALID, 22))
    _write_jsonl(p["dpo2"], _response_pairs(tok, _DPO_TRAIN, 23))
    _write_jsonl(p["dpo2_validation"], _response_pairs(tok, _DPO_VALID, 24))

    # SFT prefixes must exist as named in _paths
    for split in ("train", "valid"):
        for suf in ("_tokens.idx", "_loss_mask.idx"):
            assert os.path.exists(os.path.join(root, "sft", split + suf)), split + suf

    manifest = {
        "version": SAMPLE_DATA_VERSION,
        "tokens": tokens,
        "documents": {s: {k: len(v) for k, v in d.items()} for s, d in docs.items()},
        "long_document_tokens": LONG_DOCUMENT_TOKENS,
        "pretrain_validation_unigram_entropy": unigram_entropy(
            os.path.join(root, "pretrain_validation.yaml")),
        "sft_conversations": {"train": _SFT_TRAIN, "valid": _SFT_VALID},
        "dpo_pairs": {"train": _DPO_TRAIN, "valid": _DPO_VALID},
    }
    tmpm = os.path.join(root, "manifest.json.tmp")
    with open(tmpm, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmpm, os.path.join(root, "manifest.json"))


def yaml_dump(obj, f) -> None:
    import yaml
    yaml.safe_dump(obj, f, sort_keys=False)
