"""The ``slm`` command. Each subcommand lives in the module of its stage; this file only dispatches.

User errors (SlmError) print one line, ``error: ...``, and exit with code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from slmkit import __version__
from slmkit.config import parse_args_and_overrides
from slmkit.errors import run_command

# subcommand -> (module, function adding arguments, function running it, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "prepare": ("slmkit.prepare", "add_arguments", "run_cli", "tokenize a corpus into DATA_DIR"),
    "train": ("slmkit.train", "add_arguments", "run_cli", "train or resume a model in RUN_DIR"),
    "finetune": ("slmkit.finetune", "add_arguments", "run_cli", "fine-tune a run on chat/instruction data or domain text"),
    "generate": ("slmkit.generate.cli", "add_generate_arguments", "run_generate", "sample text from a trained model"),
    "chat": ("slmkit.generate.cli", "add_chat_arguments", "run_chat", "interactive prompt loop"),
    "eval": ("slmkit.evaluate", "add_arguments", "run_cli", "loss, perplexity, bits per byte, accuracy"),
    "info": ("slmkit.cli", "add_info_arguments", "run_info", "config, parameters and training summary of RUN_DIR"),
    "quickstart": ("slmkit.quickstart", "add_arguments", "run_cli", "the demo: prepare, train a few minutes, sample"),
    "export": ("slmkit.export", "add_arguments", "run_cli", "export to hf, onnx, torchscript, llama2c, gguf or peft (a LoRA run's adapter)"),
    "import-hf": ("slmkit.export", "add_import_arguments", "run_import", "import a GPT-2/Llama HF checkpoint"),
    "import-llama2c": ("slmkit.export.llama2c", "add_import_arguments", "run_import", "import llama2.c's files"),
    "prune": ("slmkit.prune", "add_arguments", "run_cli", "remove heads, MLP channels, layers or width: a smaller RUN_DIR"),
    "quantize": ("slmkit.export.quantize", "add_arguments", "run_cli", "int8/int4 (GGUF q8_0/q4_0 blocks) or bf16 weights in a new RUN_DIR"),
    "serve": ("slmkit.serve.cli", "add_arguments", "run_cli", "OpenAI-compatible HTTP server and playground"),
}


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    parser.add_argument("--json", action="store_true", help="print as JSON")


def run_info(args: argparse.Namespace) -> int:
    """Print a run's resolved config, parameter count and training summary."""
    from pathlib import Path

    from slmkit.checkpoint import load_run
    from slmkit.config import load_toml
    from slmkit.rundir import iter_records

    run_dir = Path(args.run_dir)
    model, tokenizer, state = load_run(run_dir, which="last")
    config = load_toml(run_dir / "config.toml") if (run_dir / "config.toml").exists() else {}
    evals = [r for r in iter_records(run_dir) if "val_loss" in r]
    info = {
        "run_dir": str(run_dir),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_non_embedding": model.num_params(),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "step": state.get("step"),
        "tokens": state.get("tokens"),
        "train_time_s": round(state.get("elapsed", 0.0), 1),
        "best_val_loss": state.get("best_val"),
        "last_eval": evals[-1] if evals else None,
        "config": config,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"run        {info['run_dir']}")
    print(f"parameters {info['parameters']:,} ({info['parameters_non_embedding']:,} without embeddings)")
    print(f"tokenizer  {tokenizer.kind}, vocab {tokenizer.vocab_size}")
    print(f"trained    {info['step']} steps, {info['tokens']:,} tokens, {info['train_time_s']}s")
    if info["last_eval"]:
        e = info["last_eval"]
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in e.items() if k != "step")
        print(f"last eval  step {e['step']}: {shown}")
    if info["best_val_loss"] is not None:
        print(f"best val   {info['best_val_loss']:.4f}")
    for section, table in config.items():
        print(f"[{section}]")
        for key, value in table.items():
            print(f"  {key} = {value}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported, so ``slm`` starts fast and one stage's
    optional dependencies never break another stage."""
    parser = argparse.ArgumentParser(prog="slm", description="Train small GPT-style language models from scratch.")
    parser.add_argument("--version", action="version", version=f"slmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add, _run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(importlib.import_module(module), add)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slm`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parse_args_and_overrides(parser, argv)  # section.key=value may also follow the options
    if args.command is None:
        parser.print_help()
        return 2
    module, _add, run, _help = COMMANDS[args.command]
    return run_command(lambda: getattr(importlib.import_module(module), run)(args))


if __name__ == "__main__":
    sys.exit(main())
