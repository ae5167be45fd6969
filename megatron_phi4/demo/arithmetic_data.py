"""The arithmetic task as trainer inputs: pre-training corpus, SFT conversations, held-out problems.

:func:`write_arithmetic_data` builds (or reuses) a data directory with the project's own tools,
the way a user's data would be built:

1. raw JSONL -- ``raw/pretrain_{train,valid}.jsonl`` (``{"text": ...}``) and
   ``raw/sft_{train,valid}.jsonl`` (``{"messages": [...]}``);
2. Phi-4 token ids -- :func:`megatron_phi4.data.preprocess.preprocess` (``append_eod``) and
   :func:`megatron_phi4.data.preprocess_chat.preprocess_chat` write indexed datasets under
   ``phi4/`` (full vocabulary; usable by a full-vocabulary model as they are);
3. the trimmed vocabulary -- every id in those datasets and in the held-out prompts and reference
   solutions, every number chunk the tokenizer can produce (``0``-``9``, ``00``-``99``,
   ``000``-``999``, so any number the model writes is in the map) and the required special tokens
   (:class:`~megatron_phi4.demo.trimmed_vocab.TrimmedVocab`), saved as ``vocab.json``;
4. trimmed ids -- each indexed dataset rewritten in trimmed ids with the project's writer
   (:func:`~megatron_phi4.demo.trimmed_vocab.trim_indexed_dataset`) under ``bin/``, plus the
   mixture YAMLs ``pretrain.yaml`` / ``pretrain_validation.yaml`` the pre-training stage reads;
5. problem files (JSONL, one problem per line) under ``problems/``, in the question format of
   Pivotal Token Search (``tools/pivotal_token_search.py --questions``: ``id``, ``prompt_ids``,
   ``reference``, ``meta``)::

       {"id": "test-000000",
        "prompt_ids": [...],            # trimmed ids: system + user turns + generation prompt
        "reference": "519",             # the exact answer, checked by the task's answer rule
        "meta": {"split": "test", "question": "What is 482 + 37?",
                 "problem": {"a": 482, "op": "+", "b": 37},
                 "phi4_prompt_ids": [...]}}  # the same prompt in Phi-4 ids

   ``test.jsonl`` (held out from every stage: evaluation only), ``validation.jsonl`` and
   ``train_pool.jsonl`` (training-split problems used by no pre-training or SFT example: the
   questions for Pivotal Token Search and DPO).

The directory is built under a temporary name and renamed into place under a file lock
(atomic); ``manifest.json`` (parameters, counts, vocabulary size) marks it complete. A complete
directory built with the same parameters is reused; one built with other parameters is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from megatron_phi4.data.cache import file_lock
from megatron_phi4.demo import arithmetic as task
from megatron_phi4.demo.trimmed_vocab import TrimmedVocab, trim_indexed_dataset
from megatron_phi4.fileio import atomic_write_json

__all__ = ["DataSizes", "ArithmeticData", "write_arithmetic_data", "read_problems",
           "ARITHMETIC_DATA_VERSION"]

ARITHMETIC_DATA_VERSION = 1


@dataclass(frozen=True)
class DataSizes:
    """How many items each file holds."""
    sft_train: int = 8000            # SFT conversations (training split)
    sft_valid: int = 100             # SFT validation conversations (validation split)
    pretrain_solutions: int = 3000   # worked solutions in the pre-training corpus (training split)
    pretrain_valid: int = 100        # validation-split worked solutions (pre-training validation)
    # passes over all number facts (one-column steps; 0-999 spelled into digits and back): the
    # spelling passes are what teach a tiny model to copy the operands' number tokens
    fact_repeats: int = 12
    test: int = 1000                 # held-out test problems
    validation: int = 500            # validation-split problems
    train_pool: int = 1000           # fresh training-split problems for PTS / DPO

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v < (0 if k == "fact_repeats" else 1):
                raise ValueError(f"DataSizes.{k}: must be a positive integer, got {v!r}")


@dataclass
class ArithmeticData:
    """Paths of a built data directory (all absolute)."""
    root: str
    vocab_path: str
    pretrain_mixture: str
    pretrain_validation: str
    sft_train: str          # trimmed SFT prefix (PREFIX_tokens / PREFIX_loss_mask)
    sft_valid: str
    test_problems: str
    validation_problems: str
    train_pool_problems: str
    manifest: str
    phi4: Dict[str, str] = field(default_factory=dict)  # the same datasets in Phi-4 ids

    def vocab(self) -> TrimmedVocab:
        return TrimmedVocab.load(self.vocab_path)


def read_problems(path: str) -> List[dict]:
    """Records of a problem file (see module doc); errors name the file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object")
            for k in ("id", "prompt_ids", "reference"):
                if k not in rec:
                    raise ValueError(f"{path}:{n}: field {k!r} is missing")
            out.append(rec)
    return out


def _paths(root: str) -> ArithmeticData:
    j = lambda *a: os.path.join(root, *a)  # noqa: E731
    return ArithmeticData(
        root=root, vocab_path=j("vocab.json"), pretrain_mixture=j("pretrain.yaml"),
        pretrain_validation=j("pretrain_validation.yaml"), sft_train=j("bin", "sft_train"),
        sft_valid=j("bin", "sft_valid"), test_problems=j("problems", "test.jsonl"),
        validation_problems=j("problems", "validation.jsonl"),
        train_pool_problems=j("problems", "train_pool.jsonl"), manifest=j("manifest.json"),
        phi4={"pretrain_train": j("phi4", "pretrain_train_text_document"),
              "pretrain_valid": j("phi4", "pretrain_valid_text_document"),
              "sft_train": j("phi4", "sft_train"), "sft_valid": j("phi4", "sft_valid")})


def _params(seed: int, sizes: DataSizes, spec: task.TaskSpec) -> dict:
    return {"version": ARITHMETIC_DATA_VERSION, "seed": int(seed), "sizes": asdict(sizes),
            "task": json.loads(json.dumps(asdict(spec)))}


def _read_manifest(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_arithmetic_data(out_dir: str, *, seed: int = 1234, sizes: DataSizes = DataSizes(),
                          spec: task.TaskSpec = task.DEFAULT_TASK, tokenizer=None,
                          log=print) -> ArithmeticData:
    """Build (or reuse) the arithmetic data under ``out_dir``; see the module docstring."""
    root = os.path.abspath(str(out_dir))
    params = _params(seed, sizes, spec)

    def reusable() -> bool:
        m = _read_manifest(root)
        if m is None:
            return False
        if m.get("params") != params:
            raise ValueError(f"{root}: holds arithmetic data built with other parameters "
                             f"({m.get('params')}, wanted {params}); use another directory or delete it")
        return True

    if reusable():
        return _paths(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with file_lock(root + ".lock"):
        if reusable():
            return _paths(root)
        if os.path.exists(root):  # an incomplete leftover (no manifest)
            shutil.rmtree(root)
        tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, seed, sizes, spec, params, tokenizer, log)
            os.rename(tmp, root)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def _write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _all_ids(prefix: str) -> np.ndarray:
    from megatron_phi4.data.indexed import IndexedDataset
    ds = IndexedDataset(prefix)
    return np.unique(np.concatenate(ds[0:len(ds)])) if len(ds) else np.zeros(0, np.int64)


def _build(root: str, seed: int, sizes: DataSizes, spec: task.TaskSpec, params: dict, tokenizer,
           log) -> None:
    from megatron_phi4.data.preprocess import preprocess
    from megatron_phi4.data.preprocess_chat import preprocess_chat
    from megatron_phi4.tokenizer import get_tokenizer

    tok = tokenizer or get_tokenizer()
    p = _paths(root)
    for d in ("raw", "phi4", "bin", "problems"):
        os.makedirs(os.path.join(root, d), exist_ok=True)

    # ---- problems: disjoint by construction (split_of); within a use, distinct
    sft_train = task.sample_problems("train", sizes.sft_train, seed, spec)
    pre_train = task.sample_problems("train", sizes.pretrain_solutions, seed + 1, spec, exclude=sft_train)
    pool = task.sample_problems("train", sizes.train_pool, seed + 2, spec, exclude=sft_train + pre_train)
    validation = task.sample_problems("validation", sizes.validation + sizes.sft_valid
                                      + sizes.pretrain_valid, seed, spec)
    val_problems = validation[:sizes.validation]
    sft_valid = validation[sizes.validation:sizes.validation + sizes.sft_valid]
    pre_valid = validation[sizes.validation + sizes.sft_valid:]
    test = task.sample_problems("test", sizes.test, seed, spec)

    # ---- raw JSONL -> Phi-4 ids with the project's preprocessing
    raw = lambda name: os.path.join(root, "raw", name)  # noqa: E731
    _write_jsonl(raw("pretrain_train.jsonl"),
                 ({"text": t} for t in task.pretrain_documents(pre_train, seed, sizes.fact_repeats)))
    _write_jsonl(raw("pretrain_valid.jsonl"),
                 ({"text": f"Question: {q.question}\nSolution:\n{task.worked_solution(q)}"} for q in pre_valid))
    _write_jsonl(raw("sft_train.jsonl"), ({"messages": task.messages(q)} for q in sft_train))
    _write_jsonl(raw("sft_valid.jsonl"), ({"messages": task.messages(q)} for q in sft_valid))
    log(f"[arithmetic data] tokenizing into {root}/phi4 ...")
    for split in ("train", "valid"):
        preprocess([raw(f"pretrain_{split}.jsonl")], os.path.join(root, "phi4", f"pretrain_{split}"),
                   append_eod=True, tokenizer=tok, quiet=True)
        preprocess_chat([raw(f"sft_{split}.jsonl")], p.phi4[f"sft_{split}"], tokenizer=tok, quiet=True)

    # ---- the trimmed vocabulary: everything the task's text uses, plus every number chunk
    prompts = {name: [tok.apply_chat_template(task.prompt_messages(q), add_generation_prompt=True)
                      for q in qs] for name, qs in (("test", test), ("validation", val_problems),
                                                     ("train_pool", pool))}
    solutions = [tok.encode(task.worked_solution(q)) for q in test + val_problems + pool]
    chunks = [tok.token_to_id(s) for s in
              [str(i) for i in range(10)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]]
    id_sets = [_all_ids(p.phi4["pretrain_train"]), _all_ids(p.phi4["pretrain_valid"]),
               _all_ids(p.phi4["sft_train"] + "_tokens"), _all_ids(p.phi4["sft_valid"] + "_tokens")]
    vocab = TrimmedVocab.from_token_ids(id_sets + [x for v in prompts.values() for x in v] + solutions,
                                        extra_ids=chunks)
    vocab.save(p.vocab_path)
    log(f"[arithmetic data] trimmed vocabulary: {vocab.num_used} Phi-4 ids -> {vocab.vocab_size} rows")

    # ---- trimmed indexed datasets + mixtures
    trim_indexed_dataset(p.phi4["pretrain_train"], os.path.join(root, "bin", "pretrain_train"), vocab)
    trim_indexed_dataset(p.phi4["pretrain_valid"], os.path.join(root, "bin", "pretrain_valid"), vocab)
    for split, dst in (("train", p.sft_train), ("valid", p.sft_valid)):
        trim_indexed_dataset(p.phi4[f"sft_{split}"] + "_tokens", dst + "_tokens", vocab)
        trim_indexed_dataset(p.phi4[f"sft_{split}"] + "_loss_mask", dst + "_loss_mask", vocab, map_ids=False)
    import yaml
    for name, prefix, desc in (("pretrain.yaml", "bin/pretrain_train", "arithmetic pre-training corpus"),
                               ("pretrain_validation.yaml", "bin/pretrain_valid",
                                "arithmetic validation-split worked solutions")):
        with open(os.path.join(root, name), "w") as f:
            yaml.safe_dump({"description": f"{desc} (trimmed vocabulary, see vocab.json)",
                            "sources": [{"name": "arithmetic", "weight": 1.0, "paths": [prefix]}]},
                           f, sort_keys=False)

    # ---- problem files
    for name, qs, split in (("test", test, "test"), ("validation", val_problems, "validation"),
                            ("train_pool", pool, "train")):
        path = os.path.join(root, "problems", f"{name}.jsonl")
        _write_jsonl(path, ({"id": f"{name}-{i:06d}", "prompt_ids": vocab.to_trimmed(ids),
                             "reference": str(q.answer),
                             "meta": {"split": split, "question": q.question, "problem": q.to_json(),
                                      "phi4_prompt_ids": ids}}
                            for i, (q, ids) in enumerate(zip(qs, prompts[name]))))

    manifest = {"params": params, "vocab_size": vocab.vocab_size, "vocab_used": vocab.num_used,
                "pad_id": vocab.pad_id, "eod_id": vocab.eod_id,
                "counts": {"sft_train": len(sft_train), "sft_valid": len(sft_valid),
                           "pretrain_solutions": len(pre_train), "pretrain_valid": len(pre_valid),
                           "test": len(test), "validation": len(val_problems), "train_pool": len(pool)},
                "tokens": {k: int(_num_tokens(v)) for k, v in
                           (("pretrain_train", os.path.join(root, "bin", "pretrain_train")),
                            ("pretrain_valid", os.path.join(root, "bin", "pretrain_valid")),
                            ("sft_train", p.sft_train + "_tokens"), ("sft_valid", p.sft_valid + "_tokens"))}}
    atomic_write_json(os.path.join(root, "manifest.json"), manifest)


def _num_tokens(prefix: str) -> int:
    from megatron_phi4.data.indexed import IndexedDataset
    return int(IndexedDataset(prefix).sequence_lengths.sum())
