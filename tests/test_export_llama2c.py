"""llama2.c export and import, judged by llama2.c's own C programs (``run.c``, ``runq.c``, MIT,
unmodified, in ../shared/peers/llama2c): compiled here with ``gcc -O3 -lm`` and run greedily
(``-t 0``) on our export; their text must be the text slmkit generates. The model is trained for a
few seconds on the test corpus, so its greedy text is a story (with clear margins between the
top logits, which the int8 check needs)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.export.llama2c import (
    export_llama2c, load_llama2c, read_model_bin, write_model_bin, write_tokenizer_bin)
from slmkit.generate import SamplingConfig, generate_tokens
from slmkit.model import GPT, ModelConfig
from slmkit.tokenizer import train_bpe

from conftest import make_corpus
from export_models import GPT2, LLAMA, fit, one_error_line, random_model, slm

LLAMA2C = Path(os.environ.get("SLMKIT_LLAMA2C", Path(__file__).resolve().parents[2] / "shared/peers/llama2c"))
VARIANTS = {"gqa-untied": dict(n_kv_head=2, tie_embeddings=False), "mha-tied": dict(tie_embeddings=True)}
PROMPT = "Once upon a time, Lily had a"


@pytest.fixture(scope="module")
def tok():
    return train_bpe(make_corpus(), 300)


@pytest.fixture(scope="module")
def c_programs(tmp_path_factory) -> dict[str, Path]:
    """run.c and runq.c compiled as llama2.c's README does (gcc -O3 -o run run.c -lm)."""
    if not (LLAMA2C / "run.c").is_file():
        pytest.skip(f"llama2.c's run.c is not at {LLAMA2C} (set SLMKIT_LLAMA2C to a llama2.c clone)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the llama2.c checks compile run.c")
    out = tmp_path_factory.mktemp("llama2c")
    for name in ("run", "runq"):
        subprocess.run(["gcc", "-O3", "-o", str(out / name), str(LLAMA2C / f"{name}.c"), "-lm"], check=True)
    return {"run": out / "run", "runq": out / "runq"}


def trained(tok, docs: list[str] | None = None, **kw) -> GPT:
    """A tiny Llama-flavoured model after 150 AdamW steps on ``docs`` (default: the corpus), about 3 s."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_embd=64, **LLAMA)
    model = GPT(ModelConfig(**{**cfg, **kw}))
    ids = [i for doc in docs or make_corpus() for i in [tok.eot_id, *tok.encode(doc)]]
    ids *= max(1, 4000 // len(ids))
    return fit(model, ids, 150)


@pytest.fixture(scope="module")
def models(tok) -> dict[str, GPT]:
    return {name: trained(tok, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def one_story_models(tok) -> dict[str, GPT]:
    """Trained on one story: every next token is determined, so the top logit leads by a margin
    that int8 rounding does not close (the corpus's random names and things are near ties)."""
    return {name: trained(tok, make_corpus()[:1], **kw) for name, kw in VARIANTS.items()}


def run_c(exe: Path, folder: Path, steps: int, prompt: str | None = None) -> str:
    cmd = [str(exe), str(folder / "model.bin"), "-z", str(folder / "tokenizer.bin"), "-t", "0", "-n", str(steps)]
    done = subprocess.run(cmd + (["-i", prompt] if prompt is not None else []), capture_output=True, check=True)
    return done.stdout.decode("utf-8")


def expected_run_c_text(tok, ids: list[int]) -> str:
    """What run.c prints for the tokens after its start token: their text (sentencepiece's rule:
    one leading space is dropped after the start token) and a final newline."""
    text = tok.decode(ids)
    return (text[1:] if text.startswith(" ") else text) + "\n"


def slm_greedy(model: GPT, tok, prompt_ids: list[int], n: int) -> list[int]:
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.0)
    return generate_tokens(model, [[tok.eot_id, *prompt_ids]], cfg, tok.eot_id)[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_run_c_greedy_text_is_slmkit_greedy_text(variant, tok, models, c_programs, tmp_path):
    model = models[variant]
    export_llama2c(model, tok, tmp_path / "out")
    # run.c forwards positions 0..steps-1, the first being its start token (our <|endoftext|>), and
    # prints the token each forward picks: steps new tokens, unless it picks token 1 first.
    for steps in (16, 96):
        ours = slm_greedy(model, tok, [], steps)
        assert run_c(c_programs["run"], tmp_path / "out", steps) == expected_run_c_text(tok, ours)
    assert len(ours) < 95 and tok.decode(ours).endswith("The end."), "the story should end with <|endoftext|>"
    # Prompted: run.c puts a space before the prompt (sentencepiece's dummy prefix) and encodes it
    # with its merge-by-score loop, which on this prompt gives the tokens slmkit's BPE gives.
    prompt_ids = tok.encode(" " + PROMPT)
    new = slm_greedy(model, tok, prompt_ids, 96 - len(prompt_ids))
    text = run_c(c_programs["run"], tmp_path / "out", 96, PROMPT)
    assert text == expected_run_c_text(tok, prompt_ids + new)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 40


@pytest.mark.parametrize("variant", VARIANTS)
def test_runq_c_int8_greedy_text_is_slmkit_fp32_greedy_text(variant, tok, one_story_models, c_programs, tmp_path):
    """runq.c multiplies int8 weights (groups of 64 here) by int8-quantized activations: not
    slmkit's fp32 logits, so this compares greedy picks, over the whole story (about 50 tokens),
    on a model whose top logits are far apart (a near tie may flip under int8, as it should)."""
    model = one_story_models[variant]
    export_llama2c(model, tok, tmp_path / "q", quantize="int8")
    meta = json.loads((tmp_path / "q" / "slmkit_export.json").read_text())
    assert (meta["llama2c_version"], meta["group_size"]) == (2, 64)
    ours = slm_greedy(model, tok, [], 96)
    assert len(ours) > 40
    assert run_c(c_programs["runq"], tmp_path / "q", 96) == expected_run_c_text(tok, ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_gives_identical_logits_and_files(variant, tok, models, tmp_path):
    model = models[variant]
    export_llama2c(model, tok, tmp_path / "a")
    back, tok2, note = load_llama2c(tmp_path / "a" / "model.bin", tmp_path / "a" / "tokenizer.bin")
    assert "slmkit's own" in note
    order = json.loads((tmp_path / "a" / "slmkit_export.json").read_text())["llama2c_to_slmkit_ids"]
    ids = tok.encode(PROMPT + " " + make_corpus()[3])[:90]
    with torch.no_grad():
        want = model(torch.tensor([[tok.eot_id, *ids]]))[0][..., order]  # llama2.c id order
        new = {old: n for n, old in enumerate(order)}
        got = back(torch.tensor([[1, *(new[i] for i in ids)]]))[0]
    assert torch.equal(want, got)  # the same float32 numbers, not merely close
    # The imported tokenizer is the original under the new ids: same tokens for the same text,
    # and the same bytes per token.
    text = "Once upon a time, Tom  had 12 cakes!\n\nThe end. <|endoftext|> é"
    assert tok2.encode(text) == [new[i] for i in tok.encode(text)]
    assert all(tok2.decode_bytes([new[i]]) == tok.decode_bytes([i]) for i in range(tok.vocab_size) if i != tok.eot_id)
    # Exporting the import again writes the same bytes (its order is already llama2.c's).
    export_llama2c(back, tok2, tmp_path / "b")
    for name in ("model.bin", "tokenizer.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_int8_import_is_the_dequantized_weights(tok, models, tmp_path):
    model = models["gqa-untied"]
    export_llama2c(model, tok, tmp_path / "q", quantize="int8")
    back, _, _ = load_llama2c(tmp_path / "q" / "model.bin", tmp_path / "q" / "tokenizer.bin")
    order = torch.tensor(json.loads((tmp_path / "q" / "slmkit_export.json").read_text())["llama2c_to_slmkit_ids"])
    w, q = model.lm_head.weight.detach()[order], back.lm_head.weight.detach()
    step = w.reshape(-1, 64).abs().amax(1, keepdim=True) / 127  # one int8 step per group
    err = (w.reshape(-1, 64) - q.reshape(-1, 64)).abs()
    assert bool((err <= step / 2 + 1e-7).all()) and float(err.max()) > 0


def sentencepiece_style_files(tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    """A miniature of llama2.c's own tokenizer.bin (what its tokenizer.py writes from a
    sentencepiece model: <unk>, <s>, </s>, the 256 byte pieces <0xXX>, then pieces with scores,
    spaces as " ") and a random model for it."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    words = [" ", *"abcdefhlnorst.,", "é", " t", "th", " th", "he", " the", "at", " c", " ca", " cat", " a",
             "te", " ate", " h", " hat", "ca", "fé", " café", "re", " the cat"]
    pieces += [w.encode() for w in words]
    scores = [0.0] * 259 + [-float(k) for k in range(len(words))]
    model_path, tok_path = tmp_path / "model.bin", tmp_path / "tokenizer.bin"
    with open(tok_path, "wb") as f:
        f.write(struct.pack("<i", max(map(len, pieces))))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)) + p)
    write_model_bin(random_model(len(pieces), **LLAMA, tie_embeddings=False), model_path)
    return model_path, tok_path, pieces


def test_llama2c_sentencepiece_vocab_encodes_as_run_c_does(c_programs, tmp_path):
    """The imported tokenizer of a sentencepiece vocabulary against run.c itself: prompted, run.c
    prints the prompt and continues it; a different tokenization would continue differently."""
    model_path, tok_path, pieces = sentencepiece_style_files(tmp_path)
    model, tok, note = load_llama2c(model_path, tok_path)
    assert "run.c's encoder" in note and tok.eot_id == 1
    assert tok.decode(tok.encode("the cat ate")) == " the cat ate"  # the dummy prefix
    for prompt in ("the cat ate the hat.", "a café, the cat", "that tea"):
        ids = tok.encode(prompt)
        new = slm_greedy(model, tok, ids, 32 - len(ids))
        # run.c's decoding: byte pieces print as their byte, lone unprintable bytes are skipped
        # (slmkit's tokenizer prints a byte piece that has a twin as its text, see the module).
        out = []
        for i in ids + new:
            p = pieces[i]
            p = bytes([int(p[3:5], 16)]) if p.startswith(b"<0x") else p
            if len(p) > 1 or 32 <= p[0] < 127 or p[0] in b" \t\n\v\f\r":  # C's isprint or isspace
                out.append(p)
        text = b"".join(out).decode("utf-8", "replace")
        got = subprocess.run([str(c_programs["run"]), str(model_path), "-z", str(tok_path), "-t", "0", "-n", "32",
                              "-i", prompt], capture_output=True, check=True).stdout.decode("utf-8", "replace")
        assert got == (text[1:] if text.startswith(" ") else text) + "\n", prompt


def test_refuses_what_run_c_cannot_compute(tok, tmp_path):
    cases = {
        "model.positions='learned'": GPT2,
        "model.bias=true": dict(**LLAMA, bias=True),
        "model.activation='gelu'": dict(norm="rmsnorm", positions="rope", activation="gelu"),
        "model.norm='layernorm'": dict(norm="layernorm", positions="rope", activation="swiglu"),
        "model.rope_theta=500000": dict(**LLAMA, rope_theta=500000.0),
        "model.norm_eps=1e-06": dict(**LLAMA, norm_eps=1e-6),
    }
    for setting, kw in cases.items():
        with pytest.raises(SlmError, match="cannot export to llama2.c: " + setting.replace(".", r"\.")) as e:
            export_llama2c(random_model(tok.vocab_size, **kw), tok, tmp_path / "x")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def exported(tok, tmp_path: Path, **kw) -> Path:
    out = tmp_path / "ok"
    quantize = "int8" if kw.pop("q", False) else None
    export_llama2c(random_model(tok.vocab_size, **LLAMA, **kw), tok, out, quantize)
    return out


def test_bad_model_bin_one_line_each(tok, tmp_path):
    good = exported(tok, tmp_path, tie_embeddings=False)
    data = (good / "model.bin").read_bytes()
    hdr = list(struct.unpack_from("<7i", data))

    def forged(name: str, body: bytes) -> Path:
        (tmp_path / name).write_bytes(body)
        return tmp_path / name

    def header(**change) -> bytes:
        fields = dict(zip(("dim", "hidden", "layers", "heads", "kv", "vocab", "seq"), hdr), **change)
        return struct.pack("<7i", *fields.values()) + data[28:]

    cases = [
        (forged("short.bin", data[:-100]), "truncated"),
        (forged("extra.bin", data + b"\0" * 8), "extra data"),
        (forged("tiny.bin", data[:10]), "too short"),
        (forged("zero.bin", header(dim=0)), "dim is 0"),
        (forged("neg.bin", header(layers=-3)), "n_layers is -3"),
        (forged("huge.bin", header(dim=1 << 30)), "dim is 1073741824"),
        # A header of the largest shapes we accept describes terabytes: refused by size, nothing allocated.
        (forged("big.bin", header(dim=1 << 20, hidden=1 << 20, layers=1 << 20, heads=16, kv=16, vocab=1 << 20)),
         "the header describes"),
        (forged("heads.bin", header(heads=5)), "impossible shape"),
        (forged("kv.bin", header(kv=3)), "impossible shape"),
        (forged("v1.bin", struct.pack("<Ii", 0x616B3432, 1) + data), "version 1"),
        (tmp_path / "missing.bin", "does not exist"),
    ]
    for path, pattern in cases:
        with pytest.raises(SlmError, match=pattern) as e:
            read_model_bin(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    q = (exported(tok, tmp_path / "q", q=1) / "model.bin").read_bytes()
    gs = q[:37] + struct.pack("<i", 48) + q[41:]
    for path, pattern in [(forged("q-short.bin", q[:-1]), "truncated"), (forged("q-gs.bin", gs), "group size 48"),
                          (forged("q-ver.bin", q[:4] + struct.pack("<i", 3) + q[8:]), "version 3")]:
        with pytest.raises(SlmError, match=pattern):
            read_model_bin(path)


def test_bad_tokenizer_bin_one_line_each(tok, tmp_path):
    good = exported(tok, tmp_path)
    data = (good / "tokenizer.bin").read_bytes()
    extra = data + struct.pack("<fi", 0.0, 2) + b"zz"
    last = 8 + len(tok.decode_bytes([tok.vocab_size - 1]))  # the last entry's bytes, if it is a merge
    cases = [
        (extra, "holds 301 tokens, the model's vocabulary is 300"),
        (data[:-3], "claims"),
        (data[:len(data) - last + 4], "truncated inside token"),
        (data[:2], "too short"),
        (data[:4] + struct.pack("<fi", 0.0, 1 << 30) + data[12:], "claims 1073741824 bytes"),
    ]
    for body, pattern in cases:
        (good / "tokenizer.bin").write_bytes(body)
        with pytest.raises(SlmError, match=pattern) as e:
            load_llama2c(good / "model.bin", good / "tokenizer.bin")
        assert "\n" not in str(e.value) and "tokenizer.bin" in str(e.value)


def test_wrong_files_one_line_each(tok, tmp_path, capsys):
    """Files that are not llama2.c's: a text file, a GGUF file, a v2 header with a wrong magic, an
    empty file, as model.bin; a GGUF or text file as tokenizer.bin. One line naming the file, no
    allocation from the garbage header (a text's bytes read as dims describe gigabytes), no run."""
    good = exported(tok, tmp_path)
    data = (good / "model.bin").read_bytes()
    bodies = {
        "text.bin": (b"Once upon a time there was a text file.\n" * 50, "not a llama2.c model.bin"),
        "model.gguf": (b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + b"\0" * 2000, "not a llama2.c model.bin"),
        "magic.bin": (struct.pack("<Ii", 0x12345678, 2) + data, "not a llama2.c model.bin"),
        "empty.bin": (b"", "too short"),
    }
    for name, (body, pattern) in bodies.items():
        (tmp_path / name).write_bytes(body)
        with pytest.raises(SlmError, match=pattern) as e:
            read_model_bin(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
        one_error_line(capsys, slm("import-llama2c", tmp_path / name, good / "tokenizer.bin", "--out", tmp_path / "r"), name)
    for body, pattern in [(b"GGUF" + b"\0" * 100, "truncated"), (b"hello world" * 20, "not a tokenizer.bin")]:
        (good / "tokenizer.bin").write_bytes(body)
        with pytest.raises(SlmError, match=pattern) as e:
            load_llama2c(good / "model.bin", good / "tokenizer.bin")
        assert "\n" not in str(e.value) and "tokenizer.bin" in str(e.value)
    assert not (tmp_path / "r").exists()


def test_cli_export_import_then_fine_tune(run_dir, corpus_file, tmp_path, capsys):
    """slm export --format llama2c, slm import-llama2c, data prepared with the imported tokenizer,
    and slm train continuing from the imported weights; bad input is one error line."""
    from slmkit.checkpoint import load_run
    from slmkit.prepare import prepare
    from slmkit.train import train

    assert slm("export", run_dir, "--format", "llama2c", "--out", tmp_path / "l2c") == 0
    assert slm("export", run_dir, "--format", "llama2c", "--quantize", "int8", "--out", tmp_path / "l2cq") == 0
    assert "model.bin" in capsys.readouterr().out
    folder = tmp_path / "l2c"
    assert slm("import-llama2c", folder / "model.bin", folder / "tokenizer.bin", "--out", tmp_path / "run") == 0
    assert "--tokenizer-from" in capsys.readouterr().out
    original, tok, _ = load_run(run_dir)
    imported, tok2, info = load_run(tmp_path / "run", which="last")
    assert info["step"] == 0 and tok2.eot_id == 1 and tok2.decode(tok2.encode(PROMPT)) == PROMPT
    order = json.loads((folder / "slmkit_export.json").read_text())["llama2c_to_slmkit_ids"]
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        want = original(torch.tensor([ids]))[0][..., order]
        got = imported(torch.tensor([tok2.encode(PROMPT)]))[0]
    assert torch.equal(want, got)
    data = tmp_path / "data"
    prepare([str(corpus_file)], data, tokenizer_from=tmp_path / "run", val_fraction=0.1)
    summary = train(data, tmp_path / "run", overrides=["train.max_steps=2", "train.batch_size=4", "train.eval_batches=1",
                                                       "train.warmup_steps=0", "train.plot=false"], quiet=True)
    assert summary["steps"] == 2
    capsys.readouterr()
    (tmp_path / "bad.bin").write_bytes((folder / "model.bin").read_bytes()[:-4])
    one_error_line(capsys, slm("import-llama2c", tmp_path / "bad.bin", folder / "tokenizer.bin", "--out",
                               tmp_path / "new"), "truncated")
    one_error_line(capsys, slm("import-llama2c", folder / "model.bin", folder / "tokenizer.bin", "--out",
                               tmp_path / "run"), "")
    assert not (tmp_path / "new").exists()
