"""Tokenize chat JSONL into ``PREFIX_tokens`` + ``PREFIX_loss_mask`` indexed datasets.

Input: one conversation per line, ``{"messages": [{"role": ..., "content": ...}, ...]}``.
Output: two datasets with one sequence per conversation and identical sequence lengths:

* ``PREFIX_tokens`` (int32): the Phi-4 chat format
  ``<|im_start|>{role}<|im_sep|>{content}<|im_end|>`` per message, no newlines;
* ``PREFIX_loss_mask`` (uint8): 1 on the tokens of every assistant message's content and its
  closing ``<|im_end|>``, 0 elsewhere (built by
  :meth:`Phi4Tokenizer.apply_chat_template_with_mask`).

Validation (bad lines are skipped with ``file:line`` and a reason, or fail with ``--strict``):
``messages`` must be a non-empty list of objects with string ``role`` in system/user/assistant and
string ``content``; ``system`` only as the first message; at least one assistant message with
non-empty content; no message may have empty content unless ``--allow-empty-content``.
Message contents are tokenized as plain text (special-token strings cannot inject control tokens).

Uses the same engine as :mod:`megatron_phi4.data.preprocess` (workers, partial files, atomic merge,
resume, shards).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_phi4.data._preprocess_core import BadRecord, Processor, RunResult, cli_main, run
from megatron_phi4.tokenizer import CHAT_ROLES, Phi4Tokenizer

__all__ = ["ChatProcessor", "preprocess_chat", "validate_messages", "main"]


def validate_messages(obj: Any, messages_key: str = "messages",
                      allow_empty_content: bool = False) -> List[Dict[str, str]]:
    """Check one chat record; returns its messages or raises :class:`BadRecord`."""
    if not isinstance(obj, dict):
        raise BadRecord("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if messages_key not in obj:
        raise BadRecord("missing_key", f"key {messages_key!r} not found")
    msgs = obj[messages_key]
    if not isinstance(msgs, list):
        raise BadRecord("bad_messages", f"{messages_key!r} is {type(msgs).__name__}, not a list")
    if not msgs:
        raise BadRecord("empty_document", "conversation has no messages")
    out = []
    n_assistant = 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord("bad_messages", f"message {i} is {type(m).__name__}, not an object")
        if "role" not in m or "content" not in m:
            missing = [k for k in ("role", "content") if k not in m]
            raise BadRecord("bad_messages", f"message {i} lacks {', '.join(missing)}")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise BadRecord("bad_role", f"message {i} has role {role!r}; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
        if role == "system" and i != 0:
            raise BadRecord("bad_role", f"message {i}: system message is only allowed first")
        if not isinstance(content, str):
            raise BadRecord("bad_messages",
                            f"message {i} ({role}) content is {type(content).__name__}, "
                            "not a string")
        if not allow_empty_content and not content.strip():
            raise BadRecord("empty_content", f"message {i} ({role}) has empty content")
        if role == "assistant" and content.strip():
            n_assistant += 1
        out.append({"role": role, "content": content})
    if n_assistant == 0:
        raise BadRecord("no_assistant", "conversation has no non-empty assistant message")
    return out


class ChatProcessor(Processor):
    name = "chat"

    def __init__(self, tokenizer: Phi4Tokenizer, messages_key: str = "messages",
                 allow_empty_content: bool = False) -> None:
        self.tokenizer = tokenizer
        self.messages_key = messages_key
        self.required_keys, self.keys_option = [messages_key], "--messages-key"
        self.allow_empty_content = allow_empty_content
        self.outputs = [("tokens", np.int32), ("loss_mask", np.uint8)]

    def fingerprint(self) -> Dict[str, Any]:
        return {"kind": "chat", "messages_key": self.messages_key,
                "allow_empty_content": self.allow_empty_content,
                "tokenizer": getattr(self.tokenizer, "bpe_sha256", "cl100k"),
                "vocab": self.tokenizer.vocab_size, "format": "phi4-chat-v1"}

    def extract(self, obj: Any) -> List[Dict[str, str]]:
        return validate_messages(obj, self.messages_key, self.allow_empty_content)

    def _one(self, msgs) -> Tuple[List[int], List[int]]:
        return self.tokenizer.apply_chat_template_with_mask(msgs)

    def encode(self, items, pool: Optional[ThreadPoolExecutor]
               ) -> List[Tuple[np.ndarray, np.ndarray]]:
        if pool is not None and len(items) > 1:
            res = list(pool.map(self._one, items))
        else:
            res = [self._one(m) for m in items]
        lens = np.fromiter((len(ids) for ids, _ in res), dtype=np.int64, count=len(res))
        flat_ids: List[int] = []
        flat_mask: List[int] = []
        for ids, mask in res:
            flat_ids += ids
            flat_mask += mask
        return [(np.asarray(flat_ids, dtype=np.int32), lens),
                (np.asarray(flat_mask, dtype=np.uint8), lens)]


def preprocess_chat(inputs: Sequence[str], output_prefix: str, workers: int = 1,
                    tokenizer: Optional[Phi4Tokenizer] = None, messages_key: str = "messages",
                    allow_empty_content: bool = False, **kwargs) -> RunResult:
    """Library entry point; ``kwargs`` as in :func:`megatron_phi4.data._preprocess_core.run`."""
    tok = tokenizer or Phi4Tokenizer()
    return run(ChatProcessor(tok, messages_key, allow_empty_content), inputs, output_prefix,
               workers=workers, name=kwargs.pop("name", "preprocess_chat"), **kwargs)


def _build(p):
    g = p.add_argument_group("chat")
    g.add_argument("--messages-key", default="messages", help="JSON key holding the messages")
    g.add_argument("--allow-empty-content", action="store_true",
                   help="accept messages whose content is empty")

    def make(args):
        tok = Phi4Tokenizer(bpe_path=args.tokenizer_model)
        return ChatProcessor(tok, args.messages_key, args.allow_empty_content)

    return make


def main(argv: Optional[Sequence[str]] = None) -> None:
    raise SystemExit(cli_main(_build, argv, "preprocess_chat",
                              "Tokenize chat JSONL into PREFIX_tokens + PREFIX_loss_mask "
                              "indexed datasets (Phi-4 chat format)."))


if __name__ == "__main__":
    main()
