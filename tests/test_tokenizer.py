"""Tokenizer tests: exact round trips, the special token, save/load, GPT-2 ids, HF export."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.errors import SlmError
from slmkit.tokenizer import EOT, Tokenizer, load_gpt2, load_tokenizer, train_bpe

# CI runs a fresh clone with shared/ beside the repo.
GPT2_DIR = Path(__file__).resolve().parents[2] / "shared/data/gpt2"
needs_gpt2 = pytest.mark.skipif(not (GPT2_DIR / "encoder.json").is_file(), reason=f"no GPT-2 files in {GPT2_DIR}")

CORPUS = [
    "Once upon a time there was a little dog named Max. He liked to play in the park.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Café, naïve, résumé: accents are common in borrowed words.",
    "数学是研究数量、结构以及空间等概念的一门学科。日本語のテキストも少し。",
    "مرحبا بالعالم. שלום עולם.",
    "Emoji 😀🎉👩‍👩‍👧‍👦 and symbols ∑∫√ appear in chat logs.",
    "def main():\n    print('hello')\r\n\treturn 0\n",
] * 20

STRANGE = [
    "",
    "hello world",
    "  leading spaces and trailing  ",
    "👩‍👩‍👧‍👦 family, 🇫🇷 flag, 🎉",
    "中文字符，日本語のテキスト，한국어",
    "مرحبا بالعالم שלום",
    "e\u0301 a\u0308 Z\u0324\u0354\u0367\u0311\u0313",
    "\r\n\t",
    "\x00",
    "a\x00b\x7f\x1b[0m",
    "\ufeffBOM",
    "\U0010ffff\U0001d11e",
    EOT,
    f"story one{EOT}story two",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(CORPUS, 400)


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    with pytest.MonkeyPatch.context() as mp:  # loading takes ~0.5 s, so once per module
        mp.setenv("SLM_GPT2_DIR", str(GPT2_DIR))
        return load_gpt2()


@pytest.mark.parametrize("text", STRANGE)
def test_bpe_round_trip_strange_strings(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_special_token(bpe):
    assert bpe.kind == "bpe" and bpe.eot_token == EOT
    assert 257 <= bpe.vocab_size <= 400
    assert bpe.decode([bpe.eot_id]) == EOT
    # The literal separator inside text stays text: only the data pipeline inserts eot_id.
    ids = bpe.encode(f"a{EOT}b")
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == f"a{EOT}b"


def test_bpe_encode_batch_matches_encode(bpe):
    texts = CORPUS[:7] + [EOT, ""]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_decode_bytes_streams_across_token_boundaries(bpe):
    text = "😀 multi-byte 中文 characters split across byte tokens 🇫🇷"
    ids = bpe.encode(text)
    assert b"".join(bpe.decode_bytes([i]) for i in ids) == text.encode("utf-8")


def test_decode_rejects_ids_outside_vocab(bpe):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([-1])


@pytest.mark.parametrize("which", ["bpe", "gpt2"])
def test_token_bytes_add_up_to_the_text_and_specials_have_none(which, request):
    """The table bits per byte divides by: the bytes of the text tokens, none for <|endoftext|>."""
    tok = request.getfixturevalue(which)
    table = tok.token_byte_lengths()
    assert len(table) == tok.vocab_size and tok.special_ids == [tok.eot_id] and table[tok.eot_id] == 0
    text = "Once upon a time, Zoë counted 1234 stars.\n\n  <|endoftext|> is just text here. 日本"
    ids = tok.encode(text)
    assert sum(table[i] for i in ids) == len(text.encode("utf-8"))
    assert all(table[i] > 0 for i in ids)


def test_vocab_size_too_small():
    with pytest.raises(SlmError, match="at least 257"):
        train_bpe(CORPUS, 256)


def test_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    assert meta == {"kind": "bpe", "vocab_size": bpe.vocab_size, "eot_id": bpe.eot_id}
    tok = load_tokenizer(tmp_path)
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("bpe", bpe.vocab_size, bpe.eot_id)
    for text in STRANGE + CORPUS[:7]:
        assert tok.encode(text) == bpe.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id not in tok.encode(EOT)  # the plain-text rule survives a reload


def test_load_tokenizer_errors(bpe, tmp_path):
    with pytest.raises(SlmError, match="run slm prepare"):
        load_tokenizer(tmp_path / "nope")
    bpe.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SlmError, match="tokenizer.json is corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(SlmError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text("[]")
    with pytest.raises(SlmError, match="corrupt"):
        load_tokenizer(tmp_path)


def test_bpe_hf_json(bpe):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(bpe.to_hf_tokenizer_json())
    for text in CORPUS[:7]:
        assert hf.encode(text).ids == bpe.encode(text)
    assert hf.encode(EOT).ids == [bpe.eot_id]  # in the export the separator is a real special token


@needs_gpt2
def test_gpt2_known_ids(gpt2):
    assert (gpt2.kind, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert 50256 not in gpt2.encode(f"a{EOT}b")
    assert gpt2.decode([50256]) == EOT
    assert gpt2.encode_batch(["Hello world", "x"]) == [[15496, 995], gpt2.encode("x")]


@needs_gpt2
@pytest.mark.parametrize("text", STRANGE)
def test_gpt2_round_trip_and_decode_bytes(gpt2, text):
    ids = gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert b"".join(gpt2.decode_bytes([i]) for i in ids) == text.encode("utf-8")


@needs_gpt2
def test_gpt2_save_load_and_hf_json(gpt2, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    gpt2.save(tmp_path)
    for name in ("encoder.json", "vocab.bpe"):
        assert (tmp_path / name).read_bytes() == (GPT2_DIR / name).read_bytes()
    tok = load_tokenizer(tmp_path)
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    text = "Hello world! It's 2024: naïve café 😀 中文  \n\n  spaces\t\r\n end"
    assert tok.encode(text) == gpt2.encode(text)
    hf = HFTokenizer.from_str(gpt2.to_hf_tokenizer_json())
    assert hf.encode(text).ids == gpt2.encode(text)
    assert hf.encode(EOT).ids == [50256]


@needs_gpt2
def test_gpt2_from_tiktoken_cache_rebuilds_files(gpt2, tmp_path):
    # Loaded from tiktoken's cache there are no files to copy, so save() must rebuild them.
    cached = Tokenizer("gpt2", enc=gpt2._enc)
    cached.save(tmp_path)
    assert json.loads((tmp_path / "encoder.json").read_text("utf-8")) == json.loads(
        (GPT2_DIR / "encoder.json").read_text("utf-8")
    )
    merges = (tmp_path / "vocab.bpe").read_text("utf-8").split("\n")[1:]
    expected = (GPT2_DIR / "vocab.bpe").read_text("utf-8").split("\n")[1:]
    assert [m for m in merges if m] == [m for m in expected if m]
    assert load_tokenizer(tmp_path).encode("Hello world") == [15496, 995]


def test_gpt2_missing_files(monkeypatch, tmp_path):
    monkeypatch.setenv("SLM_GPT2_DIR", str(tmp_path))
    with pytest.raises(SlmError, match="encoder.json"):
        load_gpt2()


def test_gpt2_offline_without_dir(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.delenv("SLM_GPT2_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SlmError, match="set SLM_GPT2_DIR to a folder with encoder.json and vocab.bpe"):
        load_gpt2()
