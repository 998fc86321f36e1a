"""Export to Hugging Face, ONNX and TorchScript, checked by loading each with its own library and
comparing logits and greedy text with ours; import-hf back into a RUN_DIR that trains on."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from slmkit.cli import main
from slmkit.errors import SlmError
from slmkit.export import (
    OnnxGenerator, export_hf, export_model, export_onnx, export_torchscript, file_sizes, hf_architecture,
    hf_to_slmkit, quantize_int8,
)
from slmkit.model import GPT, ModelConfig
from slmkit.tokenizer import train_bpe

from conftest import make_corpus

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")

GPT2 = dict(norm="layernorm", positions="learned", activation="gelu")
LLAMA = dict(norm="rmsnorm", positions="rope", activation="swiglu")
PROMPT = "Once upon a time, Tom"


@pytest.fixture(scope="module")
def tok():
    return train_bpe(make_corpus(), 300)


def random_model(vocab: int, **kw) -> GPT:
    """A small model with every weight random (biases and norm gains too), so a wrong mapping of
    any tensor shows up in the logits, and with logits spread enough that greedy picks are clear."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.15)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


@torch.no_grad()
def our_greedy(model: GPT, ids: list[int], n: int, eot: int | None, keep: int | None = None) -> list[int]:
    """Reference greedy decoding with the full forward (no cache), written out by hand: past the
    context, the window slides to its last ``keep`` tokens (slmkit's rule: block_size // 2;
    nanoGPT's is block_size - 1, re-cropped at every step)."""
    block = model.config.block_size
    keep = block // 2 if keep is None else keep
    seq, new = list(ids[-block:]), []
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        token = int(logits[0, -1].argmax())
        new.append(token)
        seq.append(token)
        if token == eot:
            break
        if len(seq) > block:
            seq = seq[-keep:]
    return new


def slm(*args) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys, code: int, pattern: str) -> None:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and pattern in err, err


# ------------------------------------------------------------------------------ Hugging Face

HF_VARIANTS = {
    "gpt2-bias-tied": dict(**GPT2, bias=True),
    "gpt2-nobias-untied": dict(**GPT2, tie_embeddings=False),
    "llama-gqa-tied": dict(**LLAMA, n_kv_head=2),
    "llama-bias-untied": dict(**LLAMA, bias=True, tie_embeddings=False, mlp_hidden=48, rope_theta=500.0, norm_eps=1e-6),
}


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_export_matches_transformers(tmp_path, tok, variant):
    transformers = pytest.importorskip("transformers")
    model = random_model(tok.vocab_size, **HF_VARIANTS[variant])
    out = export_hf(model, tok, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(file_sizes(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == ("GPT2LMHeadModel" if variant.startswith("gpt2") else "LlamaForCausalLM")
    x = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max().item() < 1e-4
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == tok.eot_id
    ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(PROMPT)
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    ours = our_greedy(model, tok.encode(PROMPT), 12, tok.eot_id)
    assert gen == ours
    assert hf_tok.decode(gen) == tok.decode(ours)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_round_trip_without_transformers(tmp_path, tok, variant):
    model = random_model(tok.vocab_size, **HF_VARIANTS[variant])
    back, back_tok = hf_to_slmkit(export_hf(model, tok, tmp_path / "hf"))
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back_tok.encode(PROMPT) == tok.encode(PROMPT) and back_tok.eot_id == tok.eot_id


def test_gpt2_import_keeps_a_lone_bias(tmp_path, tok):
    model = random_model(tok.vocab_size, **GPT2, bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "qkv" not in name:
                p.zero_()
    back, _ = hf_to_slmkit(export_hf(model, tok, tmp_path / "hf"))
    assert back.config.bias and torch.equal(back.blocks[0].attn.qkv.bias, model.blocks[0].attn.qkv.bias)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_import_checkpoint_saved_by_transformers(tmp_path, tok, arch):
    """A model that transformers itself wrote (its own config and weight names) imports with equal logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=80,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=32, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))  # HF initialises biases and norms to constants
    hf.eval().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tok.to_hf_tokenizer_json())
    ours, _ = hf_to_slmkit(tmp_path / "hf")
    x = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("mix, pattern", [
    (dict(norm="layernorm", positions="rope", activation="gelu"), "no standard Hugging Face architecture"),
    (dict(norm="rmsnorm", positions="learned", activation="swiglu"), "no standard Hugging Face architecture"),
    (dict(norm="rmsnorm", positions="rope", activation="gelu"), "no standard Hugging Face architecture"),
    (dict(**GPT2, n_kv_head=2), "grouped-query"),
])
def test_hf_refuses_nonstandard_mixes(tmp_path, tok, mix, pattern):
    model = random_model(tok.vocab_size, **mix)
    with pytest.raises(SlmError, match=pattern):
        hf_architecture(model.config)
    with pytest.raises(SlmError, match=pattern):
        export_hf(model, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------ ONNX

ONNX_VARIANTS = {
    "gpt2": dict(**GPT2, bias=True),
    "llama-gqa": dict(**LLAMA, n_kv_head=2, tie_embeddings=False),
    "rope-layernorm-gelu": dict(norm="layernorm", positions="rope", activation="gelu"),  # no HF class, fine here
}


@pytest.mark.parametrize("variant", ONNX_VARIANTS)
def test_onnx_matches_onnxruntime(tmp_path, tok, variant):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = random_model(tok.vocab_size, **ONNX_VARIANTS[variant])
    gen = OnnxGenerator(export_onnx(model, tok, tmp_path / "onnx"), threads=1)
    x = torch.randint(0, tok.vocab_size, (3, 20))
    with torch.no_grad():
        ref = model(x)[0].numpy()
    assert np.abs(gen.logits(x.numpy()) - ref).max() < 1e-4  # full-sequence graph, other shape than traced
    # KV-cache graph: a prefill of 8 tokens, then one token per call, gives the same logits.
    logits, k, v = gen.step(x[:, :8].numpy(), gen.empty_past(3), gen.empty_past(3))
    parts = [logits]
    for t in range(8, 20):
        logits, k, v = gen.step(x[:, t : t + 1].numpy(), k, v)
        parts.append(logits)
    assert k.shape == (2, 3, model.config.kv_heads, 20, model.config.head_dim)
    assert np.abs(np.concatenate(parts, axis=1) - ref).max() < 1e-4
    # Greedy text, 40 new tokens: runs past the 32-token context, so the window slides too.
    prompt = tok.encode(PROMPT)
    assert len(prompt) + 40 > model.config.block_size
    ours = our_greedy(model, prompt, 40, tok.eot_id)
    assert gen.generate(prompt, 40) == ours
    assert gen.generate_text(PROMPT, 40) == tok.decode([t for t in ours if t != tok.eot_id])


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_every_generation_path_slides_the_context_the_same_way(tmp_path, tok, variant):
    """One context rule for every path: a prompt longer than the context is cut from the left, and
    a full window slides to its last block_size // 2 tokens. 80 greedy tokens run past the
    32-token context several times; PyTorch without a cache, with the module KV cache, with
    decode_step, the CPU decoder ("fast") and onnxruntime give the same tokens as the rule
    written out by hand, which here differ from nanoGPT's rule."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slmkit import cpu_decode
    from slmkit.generate import SamplingConfig, generate_tokens

    model = random_model(tok.vocab_size, **ONNX_VARIANTS[variant])
    assert cpu_decode.supported(model)  # so "fast" is the CPU decoder, not decode_step again
    gen = OnnxGenerator(export_onnx(model, tok, tmp_path / "onnx"), threads=1)
    cfg = SamplingConfig(max_new_tokens=80, temperature=0.0, stop_at_eot=False)
    g = torch.Generator().manual_seed(1)
    for length in (5, 20, 45):  # 45 > 32: cut, with a warning, on every path
        prompt = torch.randint(0, tok.vocab_size, (length,), generator=g).tolist()
        expected = our_greedy(model, prompt, 80, eot=None)
        assert len(set(expected)) > 10  # varied text, not one token repeated
        assert expected != our_greedy(model, prompt, 80, eot=None, keep=31)  # the rule shows in the tokens
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for path in ("uncached", "cached", "step", "fast"):
                assert generate_tokens(model, [prompt], cfg, path=path) == [expected], path
            assert gen.generate(prompt, 80, stop_at_eot=False) == expected
        cut = [w for w in caught if "longer than the context" in str(w.message)]
        assert len(cut) == (5 if length > 32 else 0)


# ------------------------------------------------------------------------------ TorchScript


def test_torchscript_matches(tmp_path, tok):
    model = random_model(tok.vocab_size, **LLAMA, n_kv_head=2)
    out = export_torchscript(model, tok, tmp_path / "ts")
    loaded = torch.jit.load(str(out / "model.pt"))
    for shape in [(1, 1), (2, 9), (3, 32)]:
        x = torch.randint(0, tok.vocab_size, shape)
        with torch.no_grad():
            assert (loaded(x) - model(x)[0]).abs().max().item() < 1e-4
    extra = {"slmkit_export.json": ""}
    torch.jit.load(str(out / "model.pt"), _extra_files=extra)
    assert json.loads(extra["slmkit_export.json"])["eot_id"] == tok.eot_id


# ------------------------------------------------------------------------------ int8


def test_int8_quantized_exports(tmp_path, tok):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    # Wider than the other tests so the linear layers, not the embeddings, dominate the size.
    model = random_model(tok.vocab_size, **LLAMA, n_embd=128, n_layer=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)  # calmer weights: int8 rounding must not swamp the signal
    x = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(x)[0]
    fp32 = export_model(model, tok, "onnx", tmp_path / "o32")
    int8 = export_model(model, tok, "onnx", tmp_path / "o8", quantize="int8")
    assert json.loads((int8 / "slmkit_export.json").read_text())["quantize"] == "int8"
    assert file_sizes(int8)["model_kv.onnx"] < 0.5 * file_sizes(fp32)["model_kv.onnx"]
    got = torch.from_numpy(OnnxGenerator(int8, threads=1).logits(x.numpy()))
    ts = export_model(model, tok, "torchscript", tmp_path / "t8", quantize="int8")
    ts32 = export_model(model, tok, "torchscript", tmp_path / "t32")
    assert file_sizes(ts)["model.pt"] < 0.6 * file_sizes(ts32)["model.pt"]
    with torch.no_grad():
        got_ts = torch.jit.load(str(ts / "model.pt"))(x)
    for logits in (got, got_ts):  # close, not equal: most greedy picks agree
        assert (logits - ref).abs().max().item() < 0.25 * ref.abs().max().item()
        assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.8
    with pytest.raises(SlmError, match="hf exports stay float32"):
        export_model(model, tok, "hf", tmp_path / "h8", quantize="int8")


def test_int8_quantized_eager_model_generates_on_the_default_path(tok):
    """quantize_int8 packs the linear weights: the default "fast" path must fall back to the
    module path (not fail reading .weight), and forcing decode_step says what to do instead."""
    from slmkit.generate import SamplingConfig, generate_tokens

    model = quantize_int8(random_model(tok.vocab_size, **LLAMA, n_embd=64, n_layer=2))
    assert not model.reads_float_weights()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0, stop_at_eot=False)
    prompts = [[5, 6, 7], [8]]
    lengths = []  # tokens per row of every forward_cached call: the prefill, then one per step
    real = model.forward_cached
    model.forward_cached = lambda idx, cache, **kw: lengths.append(idx.size(1)) or real(idx, cache, **kw)
    out = generate_tokens(model, prompts, cfg)
    assert lengths == [3] + [1] * 9 and all(len(row) == 10 for row in out)
    with pytest.raises(ValueError, match="path='cached'"):
        generate_tokens(model, prompts, cfg, path="step")


# ------------------------------------------------------------------------------ the CLI and import-hf


def imported_run(tmp_path, data_dir, capsys):
    """A RUN_DIR made by ``slm import-hf`` from a Llama export of a random model on data_dir's vocab."""
    from slmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(data_dir)
    model = random_model(tok.vocab_size, **LLAMA, n_kv_head=2)
    run = tmp_path / "imported"
    assert slm("import-hf", export_hf(model, tok, tmp_path / "hf"), "--out", run) == 0
    assert "slm train --data" in capsys.readouterr().out
    return run, model, tok


def test_import_hf_then_export_generate_and_continue_training(tmp_path, data_dir, capsys):
    """import-hf writes a RUN_DIR that loads, exports again, generates, and trains on from its weights."""
    from slmkit.checkpoint import load_run
    from slmkit.train import train

    run, model, tok = imported_run(tmp_path, data_dir, capsys)
    assert {"config.toml", "tokenizer", "last", "best"} <= {p.name for p in run.iterdir()}
    imported, tok2, info = load_run(run)
    assert info["step"] == 0 and imported.config == model.config and tok2.encode(PROMPT) == tok.encode(PROMPT)
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(imported(x)[0], model(x)[0])
    # slm export on the RUN_DIR; a second export into the same folder replaces the first.
    for fmt in ("hf", "torchscript"):
        assert slm("export", run, "--format", fmt, "--out", tmp_path / fmt) == 0
    assert "model.pt" in capsys.readouterr().out
    assert slm("export", run, "--format", "hf", "--out", tmp_path / "hf", "--which", "last") == 0
    if importlib.util.find_spec("slmkit.generate") is not None:  # the generate stage may land separately
        capsys.readouterr()
        assert slm("generate", run, "--prompt", "Once upon a time", "--max-new-tokens", 10, "--seed", 1) == 0
        assert capsys.readouterr().out.startswith("Once upon a time")
    # slm train continues from the imported weights (a tiny lr keeps them within rounding of where they were).
    summary = train(data_dir, run, overrides=["train.max_steps=2", "train.batch_size=4", "train.eval_batches=1",
                                              "train.warmup_steps=0", "train.lr=1e-9", "train.plot=false"], quiet=True)
    assert summary["steps"] == 2
    trained, _, info = load_run(run, which="last")
    assert info["step"] == 2
    with torch.no_grad():
        assert (trained(x)[0] - model(x)[0]).abs().max().item() < 1e-4


def test_cli_errors(tmp_path, data_dir, capsys):
    run, _, tok = imported_run(tmp_path, data_dir, capsys)
    one_error_line(capsys, slm("export", run, "--format", "hf", "--out", tmp_path / "x", "--quantize", "int8"),
                   "hf exports stay float32")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    one_error_line(capsys, slm("export", run, "--format", "torchscript", "--out", foreign),
                   "not an earlier slmkit export")
    assert (foreign / "notes.txt").read_text() == "mine"
    one_error_line(capsys, slm("import-hf", tmp_path / "hf", "--out", foreign), "not empty")
    one_error_line(capsys, slm("import-hf", tmp_path / "nothing", "--out", tmp_path / "new"), "no config.json")
    # A Llama-shaped folder whose tokenizer is not a byte-level BPE (e.g. SentencePiece) is refused.
    data = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    data["decoder"] = {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always", "split": True}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(data))
    one_error_line(capsys, slm("import-hf", tmp_path / "hf", "--out", tmp_path / "new"), "not a byte-level BPE")
    assert not (tmp_path / "new").exists()


def test_missing_extra_gives_one_line_hint(tmp_path, tok, monkeypatch):
    for name in ("onnx", "onnxruntime", "onnxruntime.quantization"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    model = random_model(tok.vocab_size, **LLAMA)
    with pytest.raises(SlmError, match=r"pip install 'slmkit\[export\]'") as e:
        export_onnx(model, tok, tmp_path / "onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(SlmError, match=r"pip install 'slmkit\[export\]'"):
        OnnxGenerator(tmp_path)
