"""Back to Phi-4 ids: a trimmed-vocabulary checkpoint as a full-vocabulary project checkpoint.

"Mapped back to Phi-4 ids on export" means: :func:`expand_checkpoint` writes a project checkpoint
(weights kind, ``vocab_size`` 100352) whose embedding and LM-head row for Phi-4 id
``vocab.phi4_ids[i]`` is the trimmed model's row ``i``; everything else (the decoder body, the
final norm) is copied unchanged. The result loads with :func:`megatron_phi4.api.load_model`,
takes prompts in Phi-4 ids, converts to Hugging Face with ``megatron_phi4.checkpoint.hf_convert``
like any other checkpoint, and -- for every prompt made of mapped ids -- computes exactly the
trimmed model's hidden states and, on the mapped ids, exactly its logits.

The rows of the ~99K Phi-4 ids the task never used are the open question: can the exported model
avoid preferring them *without a bias* (Phi-4's LM head has none)? Our answer, measured by the
tests:

* **Greedy decoding: yes.** An unused id's head row is the mean of the mapped rows. Its logit is
  then the mean of the mapped logits, which never exceeds their maximum (a mean is never above its
  largest term; equal only if every mapped logit is equal), so argmax never picks an unused id and
  greedy output is the trimmed model's, token for token. Embedding rows of unused ids are zero
  (never looked up for a prompt in the map).
* **Sampling: no, not without help.** No bias-free linear head can put ~99K rows far *below* the
  mapped ones for every hidden state (that needs a constant offset, i.e. a bias); with mean rows
  each unused id is as likely as a middling mapped token, and 99K of them take a large share of
  the probability mass. So sampling from the exported model uses a generation-time restriction:
  :func:`restrict_to_vocab` masks every logit outside the map to ``-inf`` (a forward hook on the
  LM head), after which the exported model's next-token distribution over mapped ids equals the
  trimmed model's (also restricted: its padding rows masked) to float rounding, so sampling at any
  temperature draws from the same distribution. The vocabulary map travels inside the export
  (``vocab.json``) so the restriction needs nothing else.

A full-vocabulary model that must sample without the restriction needs full-vocabulary training
(the unused rows then learn to be unlikely), which is what the CPU demo trims away.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from megatron_phi4.demo.trimmed_vocab import VOCAB_FILE, TrimmedVocab, VocabMapError

__all__ = ["expand_checkpoint", "restrict_to_vocab", "allowed_ids", "EMBEDDING", "LM_HEAD"]

EMBEDDING = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def expand_checkpoint(trimmed_checkpoint: str | os.PathLike, output: str | os.PathLike,
                      vocab: Optional[TrimmedVocab] = None, *, overwrite: bool = False) -> Path:
    """Write ``output``: the trimmed checkpoint ``trimmed_checkpoint`` (a training or weights
    checkpoint, or a run root with ``latest``) expanded to the Phi-4 vocabulary (see module doc),
    plus ``output/vocab.json``. ``vocab`` defaults to the ``vocab.json`` of the checkpoint's run
    directory (``<run_dir>/vocab.json``). Atomic: written under a temporary name and renamed."""
    from megatron_phi4.checkpoint.format import (
        checkpoint_tensor_meta, load_model_weights, read_meta, resolve_checkpoint, save_model_weights,
    )
    from megatron_phi4.config import ModelConfig, from_dict
    from megatron_phi4.tokenizer import PHI4_VOCAB_SIZE

    src = resolve_checkpoint(trimmed_checkpoint)
    if vocab is None:
        vocab = _vocab_near(src)
    meta = read_meta(src)
    model_cfg = dict(meta["model"])
    rows = int(model_cfg.get("vocab_size", -1))
    if rows != vocab.vocab_size:
        raise VocabMapError(f"{src}: model.vocab_size is {rows} but the trimmed vocabulary has "
                            f"{vocab.vocab_size} rows; wrong vocab.json for this checkpoint?")
    if vocab.phi4_vocab_size != PHI4_VOCAB_SIZE:
        raise VocabMapError(f"vocabulary map targets {vocab.phi4_vocab_size} ids, expected {PHI4_VOCAB_SIZE}")
    tmeta = checkpoint_tensor_meta(src)
    for name in (EMBEDDING, LM_HEAD):
        if name not in tmeta:
            raise VocabMapError(f"{src}: tensor {name!r} is missing (a checkpoint with embedding and head is needed)")
    weights = load_model_weights(src, tensor_meta=tmeta)
    used = torch.as_tensor(vocab.phi4_ids, dtype=torch.long)
    n = vocab.num_used
    emb, head = weights[EMBEDDING], weights[LM_HEAD]
    full_emb = torch.zeros(PHI4_VOCAB_SIZE, emb.shape[1], dtype=emb.dtype)
    full_emb[used] = emb[:n]
    # Unused ids: the mean mapped row (a convex combination -> logit never above the best mapped one).
    mean_row = head[:n].double().mean(0).to(head.dtype)
    full_head = mean_row.expand(PHI4_VOCAB_SIZE, -1).clone()
    full_head[used] = head[:n]
    weights[EMBEDDING], weights[LM_HEAD] = full_emb, full_head
    model_cfg["vocab_size"] = PHI4_VOCAB_SIZE
    cfg = from_dict(ModelConfig, model_cfg, "model")  # nested sections (fp8) as their dataclasses
    cfg.validate("model", check_available=False)
    out = Path(output)
    save_model_weights(weights, out, cfg, overwrite=overwrite, kind="weights",
                       exported_from=str(src), trimmed_vocab={"num_used": n, "vocab_size": vocab.vocab_size,
                                                              "unused_head_rows": "mean of mapped rows",
                                                              "unused_embedding_rows": "zero"})
    vocab.save(out / VOCAB_FILE)  # after the atomic rename: the weights are usable without it
    return out


def _vocab_near(ckpt: Path) -> TrimmedVocab:
    """The vocab.json of a checkpoint: in the checkpoint, or in the run directory above it."""
    for d in [ckpt, *ckpt.parents][:5]:
        if (d / VOCAB_FILE).is_file():
            return TrimmedVocab.load(d / VOCAB_FILE)
    raise VocabMapError(f"{ckpt}: no {VOCAB_FILE} in the checkpoint or the run directories above it; "
                        "pass vocab=")


def allowed_ids(vocab: TrimmedVocab, model_vocab_size: int) -> torch.Tensor:
    """The ids a model with ``model_vocab_size`` rows may emit under ``vocab``: the mapped trimmed
    ids ``[0, num_used)`` for the trimmed model, the mapped Phi-4 ids for an exported one."""
    if model_vocab_size == vocab.vocab_size:
        return torch.arange(vocab.num_used)
    if model_vocab_size == vocab.phi4_vocab_size:
        return torch.as_tensor(vocab.phi4_ids, dtype=torch.long)
    raise VocabMapError(f"model has {model_vocab_size} vocabulary rows; the map fits {vocab.vocab_size} "
                        f"(trimmed) or {vocab.phi4_vocab_size} (exported)")


def restrict_to_vocab(model, vocab: TrimmedVocab):
    """Generation-time restriction to the map's ids: a forward hook on ``model.lm_head`` sets every
    other logit to ``-inf``. Returns the hook handle (``.remove()`` undoes it). For generation and
    scoring only: a training loss through masked logits is not what the model was trained with.
    Single-process models only (a tensor-parallel head holds a vocabulary shard: refused)."""
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError("restrict_to_vocab: the model has no lm_head (a pipeline stage without the head?)")
    rows = int(model.config.vocab_size)
    keep = torch.zeros(rows, dtype=torch.bool)
    keep[allowed_ids(vocab, rows)] = True
    masked = ~keep

    def hook(module, args, out):
        if out.shape[-1] != rows:
            raise VocabMapError(f"restrict_to_vocab: the head produced {out.shape[-1]} logits, expected "
                                f"{rows} (a tensor-parallel vocabulary shard is not supported)")
        m = masked.to(out.device)
        return out.masked_fill(m, float("-inf"))

    return head.register_forward_hook(hook)
