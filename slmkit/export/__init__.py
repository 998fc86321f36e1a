"""Export a trained model out of slmkit, and import Hugging Face checkpoints back in.

``slm export RUN_DIR --format hf|onnx|torchscript|llama2c --out DIR [--quantize int8]`` writes a folder
(``--format gguf --outtype f32|f16|bf16|q8_0|q4_0 --out FILE.gguf`` one file):

    hf           config.json, generation_config.json, model.safetensors, tokenizer.json,
                 tokenizer_config.json, special_tokens_map.json: loads with transformers'
                 ``AutoModelForCausalLM`` / ``AutoTokenizer``, no slmkit needed. Our variants map
                 onto two standard architectures: learned positions + LayerNorm + GELU is GPT-2
                 (``GPT2LMHeadModel``), rotary + RMSNorm + SwiGLU (with or without GQA) is Llama
                 (``LlamaForCausalLM``). Other mixes are refused: no standard class computes them.
    onnx         model.onnx (input_ids -> logits, dynamic batch and sequence) and model_kv.onnx
                 (input_ids, past_key, past_value -> logits, present_key, present_value) for fast
                 decoding with onnxruntime (``OnnxGenerator``), plus tokenizer.json.
    torchscript  model.pt, a traced module (``torch.jit.load``): input_ids -> logits.
    llama2c      model.bin and tokenizer.bin for llama2.c's ``run.c`` (``--quantize int8``: version 2
                 for ``runq.c``); Llama-flavoured models only (see ``llama2c``).
    gguf         one FILE.gguf for llama.cpp (llama-cli, llama-server): ``llama`` or ``gpt2``
                 architecture, the tokenizer and chat template inside (see ``gguf``).

Every folder (not the one-file GGUF) also holds ``slmkit_export.json`` (format, shapes, eot id) so that ``OnnxGenerator``
and a second export into the same folder know what is there.

``--quantize int8`` applies dynamic int8 quantization to the linear layers (weights int8,
activations quantized on the fly): onnxruntime's for onnx, PyTorch's for torchscript. It is a
CPU inference format; ``hf`` exports stay float32.

``slm import-llama2c MODEL.bin TOKENIZER.bin --out RUN_DIR`` reads llama2.c's files the same way.

``slm import-hf PATH --out RUN_DIR`` reads a GPT-2- or Llama-shaped HF folder (config.json,
safetensors, a byte-level BPE tokenizer.json with ``<|endoftext|>``) into a RUN_DIR that
``slm generate``, ``slm eval`` and ``slm train`` (which continues from it) accept.

``--format peft`` on a LoRA run writes ``DIR/adapter`` (PEFT's adapter files) and ``DIR/base`` (the HF
export of its base): ``peft.PeftModel`` on the one with the other is the run. ``--format gguf-lora``
writes ``DIR/base.gguf`` and ``DIR/adapter.gguf`` for ``llama-cli -m DIR/base.gguf --lora
DIR/adapter.gguf`` (``gguf``); ``--format gguf`` writes the run merged. ``--format run --out RUN2``
writes the LoRA run merged as a plain RUN_DIR that no longer needs its base (``run``).

One module per format and direction: ``hf`` (both ways), ``onnx``, ``torchscript``, ``llama2c``, ``gguf``, ``peft``; ``common``
holds the output folder and its metadata. This package holds the stage: ``export_model``,
``export_run`` and the two CLI commands.

The optional packages (onnx, onnxruntime, transformers) are imported only inside the functions
that need them: ``pip install 'slmkit[export]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slmkit.errors import SlmError
from slmkit.export.common import META_FILE, file_sizes
from slmkit.export.gguf import OUTTYPES, export_gguf
from slmkit.export.hf import export_hf, hf_architecture, hf_config, hf_state_dict, hf_to_slmkit, import_hf
from slmkit.export.llama2c import export_llama2c, import_llama2c
from slmkit.export.onnx import ExportGPT, export_onnx, quantize_onnx
from slmkit.export.torchscript import export_torchscript, quantize_int8
from slmkit.generate.onnx import OnnxGenerator  # lives beside generation; re-exported for old imports
from slmkit.model import GPT

FORMATS = ("hf", "onnx", "torchscript", "llama2c", "gguf", "peft", "gguf-lora", "run")
GGUF_FORMATS = ("gguf", "gguf-lora")  # take --outtype


def export_model(model: GPT, tokenizer: Any, fmt: str, out: str | Path, quantize: str | None = None,
                 outtype: str | None = None) -> Path:
    """Export an in-memory model and tokenizer; see the module docstring for the formats."""
    if fmt not in FORMATS:
        raise SlmError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise SlmError(f"--quantize {quantize!r} is not supported: the only choice is int8")
    _check_type_options(fmt, quantize, outtype)
    if fmt in ("peft", "gguf-lora", "run"):
        raise SlmError(f"--format {fmt} exports a LoRA run (its adapter and its base, or merged): export the run (slm export RUN)")
    model = model.float().cpu().eval()
    if fmt == "gguf":
        return export_gguf(model, tokenizer, out, outtype or "f32")
    if fmt == "hf":
        if quantize:
            raise SlmError("--quantize int8 applies to --format onnx and torchscript; hf exports stay float32")
        return export_hf(model, tokenizer, out)
    if fmt == "onnx":
        return export_onnx(model, tokenizer, out, quantize)
    if fmt == "llama2c":
        return export_llama2c(model, tokenizer, out, quantize)
    return export_torchscript(model, tokenizer, out, quantize)


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, quantize: str | None = None,
               which: str = "best", outtype: str | None = None) -> Path:
    """Export RUN_DIR's ``best`` (or ``last``) checkpoint to ``out``."""
    from slmkit.checkpoint import load_run

    if fmt == "hf" and quantize:
        raise SlmError("--quantize int8 applies to --format onnx and torchscript; hf exports stay float32")
    _check_type_options(fmt, quantize, outtype)
    if fmt == "peft":
        if quantize:
            raise SlmError("--quantize does not apply to --format peft: the adapter and its base stay float32")
        from slmkit.export.peft import export_peft_run

        return export_peft_run(run_dir, out, which)
    if fmt == "gguf-lora":
        from slmkit.export.gguf import export_gguf_lora_run

        return export_gguf_lora_run(run_dir, out, outtype or "f32", which)
    if fmt == "run":
        if quantize:
            raise SlmError("--quantize does not apply to --format run: quantize the merged run with slm quantize")
        from slmkit.export.run import export_merged_run

        return export_merged_run(run_dir, out, which)
    model, tokenizer, _ = load_run(run_dir, device="cpu", which=which)
    return export_model(model, tokenizer, fmt, out, quantize, outtype)


def _check_type_options(fmt: str, quantize: str | None, outtype: str | None) -> None:
    """--outtype belongs to gguf, --quantize to the other formats: refuse the wrong pairing."""
    if fmt in GGUF_FORMATS and quantize:
        raise SlmError("--quantize is not a GGUF option: use --outtype q8_0 (or q4_0, f16, bf16, f32)")
    if fmt not in GGUF_FORMATS and outtype:
        raise SlmError(f"--outtype applies to --format gguf; {fmt} takes --quantize int8 where it has one")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hf (transformers), onnx (onnxruntime), torchscript, llama2c (run.c) or gguf (llama.cpp); "
                             "a LoRA run also: peft, gguf-lora (llama.cpp's base + --lora adapter) or run (merged RUN_DIR)")
    parser.add_argument("--out", required=True,
                        help="folder to write (created; an earlier export there is replaced); for gguf the .gguf file")
    parser.add_argument("--outtype", choices=OUTTYPES, help="gguf: the matrices' type (default f32)")
    parser.add_argument("--quantize", choices=["int8"], help="dynamic int8 linear layers, for CPU inference (onnx, torchscript); llama2c: runq.c's int8 model.bin")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to export")


def run_cli(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.format, args.out, quantize=args.quantize, which=args.which,
                     outtype=args.outtype)
    sizes = {out.name: out.stat().st_size} if out.is_file() else file_sizes(out)
    kind = " int8" if args.quantize else f" {args.outtype or 'f32'}" if args.format in GGUF_FORMATS else ""
    print(f"exported {args.run_dir} as {args.format}{kind} to {out}")
    for name, size in sizes.items():
        print(f"  {name:28s} {size / 1e6:10.2f} MB")
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a Hugging Face GPT-2/Llama model folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, help="new RUN_DIR to create")


def run_import(args: argparse.Namespace) -> int:
    run_dir = import_hf(args.path, args.out)
    from slmkit.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir, which="last")
    print(f"imported {args.path} into {run_dir}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocab {tokenizer.vocab_size}; continue with: slm train --data DATA_DIR --out {run_dir}")
    return 0


__all__ = [
    "ExportGPT", "OnnxGenerator", "export_gguf", "export_hf", "export_llama2c", "export_model", "export_onnx", "export_run", "export_torchscript",
    "file_sizes", "hf_architecture", "hf_config", "hf_state_dict", "hf_to_slmkit", "import_hf", "import_llama2c", "quantize_int8",
    "quantize_onnx",
]
