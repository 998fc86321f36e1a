"""Prepare tests: reading inputs, prepare() and the data directory it writes, the built-in corpus."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from slmkit import prepare as prepare_mod
from slmkit.data import load_meta, open_split
from slmkit.errors import SlmError
from slmkit.prepare import builtin_corpus, prepare, read_documents
from slmkit.tokenizer import EOT, load_tokenizer

TINYSTORIES = Path(__file__).resolve().parents[2] / "shared/data/tinystories/train.txt"

WORDS = "the cat dog sat ran on a mat in park happy little girl boy ball red blue sun tree".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct small documents, some with non-ASCII text."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(5, 30)))
        extra = " café 😀" if i % 5 == 0 else ""
        docs.append(f"Story {i}: " + " ".join(words) + "." + extra)
    return docs


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{d}\n{EOT}\n" for d in docs), encoding="utf-8")
    return path


def split_docs(tokens: np.ndarray, tok) -> list[str]:
    """Decode a token stream back into documents (every document ends with eot)."""
    assert len(tokens) and tokens[-1] == tok.eot_id
    ends = np.flatnonzero(tokens == tok.eot_id)
    starts = np.r_[0, ends[:-1] + 1]
    return [tok.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)]


# --- reading ------------------------------------------------------------------------------------


def test_txt_with_separators(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(f"first story\nline two\n{EOT}\n  second  \n  {EOT}  \n\n{EOT}\nthird", encoding="utf-8")
    assert list(read_documents([str(f)])) == ["first story\nline two", "second", "third"]


def test_txt_without_separators_is_one_document(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("\nChapter 1\r\n\r\nIt was a dark night.\r\n", encoding="utf-8")
    assert list(read_documents(str(f))) == ["Chapter 1\n\nIt was a dark night."]


def test_literal_separator_inside_a_line_is_text(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(f"he wrote {EOT} in a line\n{EOT}\nnext", encoding="utf-8")
    assert list(read_documents([f])) == [f"he wrote {EOT} in a line", "next"]


def test_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    lines = [{"text": " keep  spaces\n"}, {"text": "   "}, {"text": "two", "id": 7}]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert list(read_documents([str(f)])) == [" keep  spaces\n", "two"]


def test_directory_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    write_txt(tmp_path / "sub" / "b.txt", ["b1", "b2"])
    (tmp_path / "a.jsonl").write_text('{"text": "a1"}\n', encoding="utf-8")
    (tmp_path / "README.md").write_text("not a corpus")
    write_txt(tmp_path / "c.txt", ["c1"])
    assert list(read_documents([str(tmp_path)])) == ["a1", "c1", "b1", "b2"]


def test_missing_path(tmp_path):
    with pytest.raises(SlmError, match=r"nope\.txt does not exist"):
        read_documents([str(tmp_path / "nope.txt")])


def test_not_utf8_names_offset(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(b"hello\n<|endoftext|>\ncaf\xe9 au lait\n")
    with pytest.raises(SlmError) as e:
        list(read_documents([str(f)]))
    msg = str(e.value)
    assert str(f) in msg and "byte offset 23" in msg and "iconv -f latin1 -t utf-8" in msg


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(SlmError, match=r"bad\.jsonl line 2 is not valid JSON"):
        list(read_documents([str(f)]))
    f.write_text('{"text": "ok"}\n\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(SlmError, match=r'bad\.jsonl line 3 has no "text"'):
        list(read_documents([str(f)]))


def test_unsupported_extension(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    with pytest.raises(SlmError, match=r"data\.csv has unsupported extension '\.csv'"):
        read_documents([str(f)])


def test_empty_corpus(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text(f"\n{EOT}\n  \n")
    with pytest.raises(SlmError, match="no documents"):
        prepare([str(f)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_offline(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(prepare_mod, "_hub_reachable", lambda endpoint: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    for spec in ("hf:roneneldan/TinyStories", "hf:someone/corpus", "hf:someone/corpus/x.txt"):
        with pytest.raises(SlmError, match="pass a local .txt or .jsonl file"):
            read_documents([spec])
    with pytest.raises(SlmError, match="OWNER/NAME"):
        read_documents(["hf:justname"])


def test_hf_offline_uses_cached_files(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def cached(repo, name, **kwargs):
        calls.append((repo, name, kwargs["repo_type"], kwargs["local_files_only"]))
        return str(write_txt(tmp_path / name, [f"{name} story"]))

    monkeypatch.setattr(prepare_mod, "_hub_reachable", lambda endpoint: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    docs = list(read_documents(["hf:roneneldan/TinyStories"]))
    assert docs == ["TinyStories-train.txt story", "TinyStories-valid.txt story"]
    assert calls == [
        ("roneneldan/TinyStories", "TinyStories-train.txt", "dataset", True),
        ("roneneldan/TinyStories", "TinyStories-valid.txt", "dataset", True),
    ]


@pytest.mark.skipif(not TINYSTORIES.is_file(), reason="shared TinyStories sample not present")
def test_tinystories_sample():
    docs = list(read_documents([str(TINYSTORIES)]))
    assert len(docs) == 8544 and all(d and EOT not in d for d in docs)


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_writes_consistent_data_dir(tmp_path):
    docs = make_docs(60)
    f = write_txt(tmp_path / "corpus.txt", docs)
    out = tmp_path / "data"
    meta = prepare([str(f)], out, vocab_size=300, val_fraction=0.1)
    assert meta == load_meta(out)
    assert (meta["tokenizer"], meta["dtype"], meta["slmkit_version"]) == ("bpe", "uint16", prepare_mod.__version__)
    tok = load_tokenizer(out)
    assert (meta["vocab_size"], meta["eot_id"]) == (tok.vocab_size, tok.eot_id)

    got = {}
    for split in ("train", "val"):
        tokens = open_split(out, split)
        assert (out / f"{split}.bin").stat().st_size == 2 * meta[split]["tokens"] == 2 * len(tokens)
        assert tokens[-1] == tok.eot_id and int((tokens == tok.eot_id).sum()) == meta[split]["documents"]
        got[split] = split_docs(np.asarray(tokens), tok)
        assert meta[split]["bytes"] == sum(len(d.encode()) for d in got[split])
    # A random 10% is val, each document exactly once, order kept within a split.
    assert len(got["val"]) == 6 and len(got["train"]) == 54
    assert not set(got["train"]) & set(got["val"])
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    assert got["train"] == [d for d in docs if d in set(got["train"])]
    assert meta["sources"] == [
        {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
    ]
    # Same seed, same split; no temp folders left beside the data dir.
    prepare([str(f)], tmp_path / "again", vocab_size=300, val_fraction=0.1)
    assert (tmp_path / "again" / "val.bin").read_bytes() == (out / "val.bin").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["again", "corpus.txt", "data"]


def test_prepare_with_val_inputs(tmp_path):
    train_docs, val_docs = make_docs(30, seed=1), make_docs(8, seed=2)
    ftrain = write_txt(tmp_path / "train.txt", train_docs)
    fval = tmp_path / "val.jsonl"
    fval.write_text("".join(json.dumps({"text": d}) + "\n" for d in val_docs), encoding="utf-8")
    meta = prepare([str(ftrain)], tmp_path / "d", vocab_size=300, val_inputs=[str(fval)])
    tok = load_tokenizer(tmp_path / "d")
    assert split_docs(np.asarray(open_split(tmp_path / "d", "train")), tok) == train_docs
    assert split_docs(np.asarray(open_split(tmp_path / "d", "val")), tok) == val_docs
    assert (meta["train"]["documents"], meta["val"]["documents"]) == (30, 8)
    assert [s["path"] for s in meta["sources"]] == [str(ftrain), str(fval)]
    with pytest.raises(SlmError, match="both a training and a validation input"):
        prepare([str(ftrain)], tmp_path / "e", val_inputs=[str(ftrain)])


def test_prepare_reuses_a_tokenizer(tmp_path):
    first = write_txt(tmp_path / "a.txt", make_docs(30, seed=1))
    prepare([str(first)], tmp_path / "a", vocab_size=300, val_fraction=0.1)
    # New text tokenized with the first corpus's BPE, given as a data dir or as a run dir's layout.
    docs = make_docs(12, seed=3)
    second = write_txt(tmp_path / "b.txt", docs)
    shutil.copytree(tmp_path / "a", tmp_path / "run" / "tokenizer")
    for source in (tmp_path / "a", tmp_path / "run"):
        out = tmp_path / f"b-{source.name}"
        meta = prepare([str(second)], out, vocab_size=999, val_fraction=0.25, tokenizer_from=source)
        assert (out / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
        assert meta["vocab_size"] == 300 and meta["tokenizer_from"] == str(source)
        tok = load_tokenizer(out)
        got = split_docs(np.asarray(open_split(out, "train")), tok) + split_docs(np.asarray(open_split(out, "val")), tok)
        assert sorted(got) == sorted(docs)
    with pytest.raises(SlmError, match="has no tokenizer"):
        prepare([str(second)], tmp_path / "c", tokenizer_from=tmp_path)


@pytest.mark.skipif(not (TINYSTORIES.parents[1] / "gpt2").is_dir(), reason="shared GPT-2 files not present")
def test_prepare_with_gpt2(tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_GPT2_DIR", str(TINYSTORIES.parents[1] / "gpt2"))
    docs = ["Hello world", "Another story. 😀"] + make_docs(10)
    f = write_txt(tmp_path / "c.txt", docs)
    meta = prepare([str(f)], tmp_path / "d", tokenizer="gpt2", val_fraction=0.2)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    monkeypatch.delenv("SLM_GPT2_DIR")  # the data dir carries its own copy of the vocabulary
    tok = load_tokenizer(tmp_path / "d")
    got = split_docs(np.asarray(open_split(tmp_path / "d", "train")), tok)
    got += split_docs(np.asarray(open_split(tmp_path / "d", "val")), tok)
    assert sorted(got) == sorted(docs)


def test_prepare_single_document_splits_by_characters(tmp_path):
    f = tmp_path / "book.txt"
    text = " ".join(make_docs(20))
    f.write_text(text, encoding="utf-8")
    meta = prepare([str(f)], tmp_path / "d", vocab_size=300, val_fraction=0.1)
    tok = load_tokenizer(tmp_path / "d")
    train = split_docs(np.asarray(open_split(tmp_path / "d", "train")), tok)
    val = split_docs(np.asarray(open_split(tmp_path / "d", "val")), tok)
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    assert abs(len(val[0]) - 0.1 * len(text)) <= 1
    assert meta["train"]["documents"] == meta["val"]["documents"] == 1


def assert_cuts_are_invisible(tok, text: str) -> None:
    """Encoding the two sides of every safe cut separately must give the ids of the whole."""
    whole = tok.encode(text)
    cuts = [m.start() for m in prepare_mod._SAFE_CUT.finditer(text)]
    assert len(cuts) > 20
    for i in cuts:
        assert tok.encode(text[:i]) + tok.encode(text[i:]) == whole, (tok.kind, text[i - 15 : i + 15])


def test_long_document_is_encoded_in_identical_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "_PIECE_CHARS", 300)
    odd = ["trailing  ", "  indented", "", "", "it's Bob's", "'s", "x\t", "\u00a0nbsp", "😀 emoji", "12 34", "-- ok"]
    lines = [line for d in make_docs(40) for line in (d, odd[len(d) % len(odd)])]
    text = "First line\n" + "\n".join(lines) + "\nLast line"
    pieces = list(prepare_mod._pieces(text))
    assert len(pieces) > 5 and "".join(pieces) == text
    f = tmp_path / "big.txt"
    f.write_text(text, encoding="utf-8")
    (tmp_path / "val.txt").write_text("a small validation text", encoding="utf-8")
    meta = prepare([str(f)], tmp_path / "d", vocab_size=400, val_inputs=[str(tmp_path / "val.txt")])
    tok = load_tokenizer(tmp_path / "d")
    assert open_split(tmp_path / "d", "train").tolist() == tok.encode(text) + [tok.eot_id]
    assert meta["train"]["documents"] == 1 and meta["train"]["bytes"] == len(text.encode())
    assert_cuts_are_invisible(tok, text)
    gpt2_dir = TINYSTORIES.parents[1] / "gpt2"
    if gpt2_dir.is_dir():  # the cut rule holds for GPT-2's regex too
        monkeypatch.setenv("SLM_GPT2_DIR", str(gpt2_dir))
        from slmkit.tokenizer import load_gpt2

        gpt2 = load_gpt2()
        assert_cuts_are_invisible(gpt2, text)
        assert gpt2.encode("a\n\n") + gpt2.encode("b") != gpt2.encode("a\n\nb")  # why not any newline


def test_prepare_failure_keeps_old_data_dir(tmp_path, monkeypatch):
    import slmkit.tokenizer

    f = write_txt(tmp_path / "corpus.txt", make_docs(20))
    out = tmp_path / "data"
    prepare([str(f)], out, vocab_size=300)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(slmkit.tokenizer, "train_bpe", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        prepare([str(f)], out, vocab_size=300)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "data"]

    monkeypatch.undo()  # a successful rerun replaces the old data dir, leaving nothing behind
    meta = prepare([str(f)], out, vocab_size=280)
    assert load_meta(out)["vocab_size"] == meta["vocab_size"] <= 280
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "data"]


def test_prepare_refuses_foreign_non_empty_dir(tmp_path):
    f = write_txt(tmp_path / "corpus.txt", make_docs(5))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SlmError, match="not a data directory"):
        prepare([str(f)], tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    prepare([str(f)], tmp_path / "empty", vocab_size=300)  # an empty folder is fine
    assert load_meta(tmp_path / "empty")["train"]["documents"] == 4


# --- built-in corpus ----------------------------------------------------------------------------


def test_builtin_corpus():
    docs = builtin_corpus()
    assert len(docs) > 500 and all(isinstance(d, str) and d.strip() == d and d for d in docs)
    assert sum(len(d.encode("utf-8")) for d in docs) > 500_000
    assert len(set(docs)) == len(docs)
