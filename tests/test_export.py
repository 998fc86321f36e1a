"""The export stage (slmkit.export): export_model's int8 formats, slm export and slm import-hf on a
RUN_DIR that trains on, and the one-line errors."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from slmkit.errors import SlmError
from slmkit.export import OnnxGenerator, export_hf, export_model, export_onnx, file_sizes

from export_models import LLAMA, PROMPT, one_error_line, random_model, slm, tok  # noqa: F401 - tok is a fixture

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")


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
