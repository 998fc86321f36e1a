"""GGUF export, judged by llama.cpp itself (through llama-cpp-python, which builds llama.cpp from
source) and by transformers' GGUF loader: the tokens llama.cpp's tokenizer gives, its logits, its
greedy continuation, its bits per byte for each tensor type, the chat template it reads. The models
are tiny and trained for a second on the test corpus, so greedy picks have clear margins."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slmkit.chat import add_chat_tokens, chat_template_jinja, render_prompt, special_ids
from slmkit.errors import SlmError
from slmkit.export.gguf import export_gguf
from slmkit.generate import SamplingConfig, generate_tokens
from slmkit.model import GPT, ModelConfig

from conftest import make_corpus
from export_models import GPT2, LLAMA, fit, one_error_line, random_model, slm

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the gguf extra: pip install -e '.[gguf]'")
gguf = pytest.importorskip("gguf")

VARIANTS = {
    "llama-gqa-untied": dict(**LLAMA, n_kv_head=2, tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-6),
    "gpt2-gqa-bias": dict(**GPT2, n_kv_head=2, bias=True),
}
TEXT = ("Once upon a time, Tom  had 12 cakes and 345 balls!\n\n   The end. <|endoftext|> Lily's "
        "café — naïve 😀 日本語\t\ttabs  and   spaces 2024-01-02 <|end|>   \n")


@pytest.fixture(scope="module")
def tok():
    from slmkit.tokenizer import train_bpe

    return add_chat_tokens(train_bpe(make_corpus(), 300))  # 300 + the 4 chat tokens


def trained(tok, **kw) -> GPT:
    """A tiny model after 80 AdamW steps on the corpus (about a second)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=64, **kw)
    model = GPT(ModelConfig(**cfg))
    ids = [i for doc in make_corpus() for i in [tok.eot_id, *tok.encode(doc)]]
    return fit(model, ids, 80)


@pytest.fixture(scope="module")
def models(tok) -> dict[str, GPT]:
    return {name: trained(tok, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def files(tok, models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(variant, outtype) -> the exported .gguf."""
    out = tmp_path_factory.mktemp("gguf")
    done = {}
    for name, model in models.items():
        for outtype in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            done[name, outtype] = export_gguf(model, tok, out / f"{name}-{outtype}.gguf", outtype)
    return done


def load(path: Path, **kw):
    """llama.cpp with float32 keys and values in its cache (its default is f16), so f32 weights
    compute what slmkit computes."""
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, n_batch=128, logits_all=True, verbose=False,
                           type_k=f32, type_v=f32, flash_attn=False, **kw)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def ggml_gelu(h: torch.Tensor) -> torch.Tensor:
    """GELU as ggml computes it on a CPU (``GGML_GELU_FP16``): the tanh form looked up in a table
    indexed by the input rounded to float16, the output a float16 too."""
    x = h.half().float()
    y = F.gelu(x, approximate="tanh").half().float()
    return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, y))


@pytest.fixture
def ggml_activation(monkeypatch):
    """slmkit's forward with ggml's float16-table GELU: the reference for llama.cpp's gpt2 graph."""
    import slmkit.model as m

    plain = m.activate
    monkeypatch.setattr(m, "activate", lambda h, swiglu, hidden=None: plain(h, swiglu, hidden) if swiglu else ggml_gelu(h))


def test_llama_cpp_tokenizes_as_slmkit(tok, files):
    llm = llama_cpp.Llama(str(files["llama-gqa-untied", "f32"]), vocab_only=True, verbose=False)
    ours = tok.encode(TEXT)
    # special=False: a literal "<|endoftext|>" or "<|end|>" in text is text, as in slmkit's encode
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ours
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == [tok.eot_id, *ours]
    assert llm.detokenize(ours) == TEXT.encode()
    # special=True: the control tokens are parsed, what a chat template's text needs
    sid = special_ids(tok, tok.chat_template)
    parts = TEXT.split("<|endoftext|>")
    tail, end = parts[1].split("<|end|>")
    want = [*tok.encode(parts[0]), tok.eot_id, *tok.encode(tail), sid["<|end|>"], *tok.encode(end)]
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == want
    meta = llm.metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert int(meta["tokenizer.ggml.bos_token_id"]) == tok.eot_id == llm.token_eos()
    assert int(meta["tokenizer.ggml.eot_token_id"]) == sid["<|end|>"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_logits_and_64_greedy_tokens_equal_slmkit(variant, tok, models, files, ggml_activation):
    model = models[variant]
    llm = load(files[variant, "f32"])
    ids = [tok.eot_id, *tok.encode(make_corpus(seed=1)[0])][:100]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0].numpy()
    got = llama_cpp_logits(llm, ids)
    # gpt2: the float16 GELU table turns a 1e-7 difference in a GELU input that sits on a float16
    # rounding boundary into a one-ulp step of its output, so a few logits differ by up to ~1.3e-4
    # (most by < 3e-5; without the table in the reference, by 1.2e-3).
    tolerance = 1e-4 if variant.startswith("llama") else 3e-4
    assert got.shape == want.shape and np.abs(got - want).max() < tolerance, np.abs(got - want).max()
    # 64 greedy tokens through llama.cpp's KV cache, one token per eval, past <|endoftext|> too
    prompt = [tok.eot_id, *tok.encode("Once upon a time, Mia")]
    cfg = SamplingConfig(max_new_tokens=64, temperature=0.0, stop_at_eot=False)
    ours = generate_tokens(model, [prompt], cfg, tok.eot_id)[0]
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(64):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours
    # The high-level completion: the prompt gets <|endoftext|> as BOS, it stops at end of text
    text = llm.create_completion("Once upon a time, Mia", max_tokens=64, temperature=0.0)["choices"][0]["text"]
    assert text == tok.decode(ours[:ours.index(tok.eot_id)] if tok.eot_id in ours else ours)


def bits_per_byte(llm, tok, docs: list[str]) -> float:
    """llama.cpp's bits per byte of ``docs``, each after an <|endoftext|>, its text tokens scored."""
    nats, nbytes = 0.0, 0
    for doc in docs:
        ids = [tok.eot_id, *tok.encode(doc)]
        logits = torch.from_numpy(llama_cpp_logits(llm, ids)).double()
        nats += float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        nbytes += len(doc.encode())
    return nats / nbytes / math.log(2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bits_per_byte_per_outtype(variant, tok, files):
    """f16, bf16 and q8_0 within 0.5% of f32's bits per byte in llama.cpp, q4_0 within 5%; the
    quantized files are their size (q8_0: 34 bytes per 32 values, q4_0: 18)."""
    docs = make_corpus(8, seed=2)
    bpb = {t: bits_per_byte(load(files[variant, t]), tok, docs) for t in ("f32", "f16", "bf16", "q8_0", "q4_0")}
    for t, bound in (("f16", 0.005), ("bf16", 0.005), ("q8_0", 0.005), ("q4_0", 0.05)):
        assert abs(bpb[t] / bpb["f32"] - 1) < bound, (t, bpb)
    sizes = {t: files[variant, t].stat().st_size for t in ("f32", "q8_0", "q4_0")}
    assert sizes["q8_0"] < 0.36 * sizes["f32"] and sizes["q4_0"] < 0.7 * sizes["q8_0"], sizes


def test_quantized_blocks_are_ggufs_own(tok, models, files):
    """The bytes stored for a q8_0 / q4_0 matrix are gguf.quants' encoding of our permuted weights."""
    from slmkit.export.gguf import gguf_tensors

    want = gguf_tensors(models["llama-gqa-untied"])["blk.1.attn_k.weight"].numpy()
    for t in ("q8_0", "q4_0"):
        reader = gguf.GGUFReader(str(files["llama-gqa-untied", t]))
        stored = next(x for x in reader.tensors if x.name == "blk.1.attn_k.weight")
        qtype = getattr(gguf.GGMLQuantizationType, t.upper())
        assert stored.tensor_type == qtype
        assert np.array_equal(np.asarray(stored.data).reshape(-1), gguf.quants.quantize(want, qtype).reshape(-1))


def test_chat_template_travels_and_renders_our_prompt(tok, files):
    llm = load(files["llama-gqa-untied", "q8_0"])
    template = llm.metadata["tokenizer.chat_template"]
    assert template == chat_template_jinja(tok.chat_template)
    turns = [("system", "Be brief."), ("user", "Who had a ball?")]
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    rendered = fmt(messages=[{"role": r, "content": c} for r, c in turns]).prompt
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == render_prompt(turns, tok, tok.chat_template)


def test_a_run_without_chat_template_has_none(tok, models, tmp_path):
    from slmkit.tokenizer import train_bpe

    plain = train_bpe(make_corpus(), 300)
    path = export_gguf(random_model(plain.vocab_size, **LLAMA), plain, tmp_path / "p.gguf")
    meta = llama_cpp.Llama(str(path), vocab_only=True, verbose=False).metadata
    assert "tokenizer.chat_template" not in meta and "tokenizer.ggml.eot_token_id" not in meta


def test_transformers_loads_the_llama_gguf(tok, models, files, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = files["llama-gqa-untied", "f32"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    ids = [tok.eot_id, *tok.encode(TEXT)][:100]
    with torch.no_grad():
        want = models["llama-gqa-untied"](torch.tensor([ids]))[0]
        got = hf(torch.tensor([ids])).logits
    assert float((got - want).abs().max()) < 1e-4


def test_refuses_what_llama_cpp_cannot_compute(tok, tmp_path):
    cases = {
        "positions=learned, norm=rmsnorm": dict(norm="rmsnorm", positions="learned", activation="swiglu"),
        "positions=rope, norm=layernorm, activation=gelu": dict(norm="layernorm", positions="rope", activation="gelu"),
    }
    for setting, kw in cases.items():
        with pytest.raises(SlmError, match="cannot export to GGUF: no llama.cpp architecture computes model." + setting):
            export_gguf(random_model(tok.vocab_size, **kw), tok, tmp_path / "x.gguf")
    odd = random_model(tok.vocab_size, **LLAMA, n_embd=48)  # rows of 48 values: not whole 32-value blocks
    for t in ("q8_0", "q4_0"):
        with pytest.raises(SlmError, match=f"as {t}: token_embd.weight has rows of 48 values") as e:
            export_gguf(odd, tok, tmp_path / "x.gguf", t)
        assert "\n" not in str(e.value)
    export_gguf(odd, tok, tmp_path / "ok.gguf", "f16")  # any width is fine unpacked
    with pytest.raises(SlmError, match="is a folder"):
        export_gguf(odd, tok, tmp_path, "f16")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SlmError, match="exists and is not a GGUF file"):
        export_gguf(odd, tok, tmp_path / "notes.txt", "f16")
    export_gguf(odd, tok, tmp_path / "ok.gguf", "f32")  # an earlier GGUF is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "ok.gguf"]  # nothing half-written
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_export_gguf_runs_in_llama_cpp(run_dir, tmp_path, capsys):
    from slmkit.checkpoint import load_run

    out = tmp_path / "run.gguf"
    assert slm("export", run_dir, "--format", "gguf", "--outtype", "q8_0", "--out", out) == 0
    assert "as gguf q8_0" in capsys.readouterr().out
    model, tok, _ = load_run(run_dir)
    llm = load(out)
    ids = [tok.eot_id, *tok.encode("Once upon a time, Tom had")]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(llama_cpp_logits(llm, ids) - want).max() < 0.05 * np.abs(want).max()  # q8_0, not f32
    capsys.readouterr()  # llama.cpp's own log lines
    one_error_line(capsys, slm("export", run_dir, "--format", "gguf", "--quantize", "int8", "--out", out), "--outtype")
    one_error_line(capsys, slm("export", run_dir, "--format", "hf", "--outtype", "q8_0", "--out", tmp_path / "h"),
                   "--outtype applies to --format gguf")
