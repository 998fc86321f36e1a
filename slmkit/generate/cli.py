"""The CLI: ``slm generate`` and ``slm chat``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from slmkit.config import RUN_SECTIONS, add_section_arguments, check_sections, load_toml, section_from_args
from slmkit.errors import SlmError
from slmkit.generate.generation import Generation
from slmkit.generate.sampling import SamplingConfig
from slmkit.generate.text import TextStream, stream
from slmkit.runtime import resolve_device


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    add_section_arguments(parser, SamplingConfig)
    parser.add_argument("--config", metavar="FILE.toml",
                        help="a TOML file whose [sample] section sets the options above (flags given here win)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run (default auto)")
    parser.add_argument("--which", default="best", choices=["best", "last"],
                        help="checkpoint: best validation loss or last (default best)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: PyTorch's choice); on a busy machine 1 is often fastest for one prompt")


def _sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The [sample] section of ``--config`` (if given) with the sampling flags on top, validated."""
    table: dict = {}
    if args.config:
        sections = load_toml(args.config)
        check_sections(sections, RUN_SECTIONS, args.config)
        table = sections.get("sample", {})
    return section_from_args(SamplingConfig, args, "sample", table)


def _load(args: argparse.Namespace):
    from slmkit.checkpoint import load_run

    if args.threads is not None:
        if args.threads < 1:
            raise SlmError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_run(args.run_dir, device=resolve_device(args.device), which=args.which)
    return model, tokenizer


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="", help="text to continue ('-' reads stdin; default: a new document)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the prompt, generated as one batch (default 1)")
    _add_common_arguments(parser)


def _report(tokens: int, seconds: float) -> None:
    if sys.stderr.isatty():
        print(f"[{tokens} tokens in {seconds:.1f}s, {tokens / max(seconds, 1e-9):.0f} tokens/s]", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    """``slm generate``: print the prompt and its continuation as it is produced. With
    ``--num-samples N`` the samples are generated as one batch (N times the throughput) and each
    is printed, in order, as soon as it is complete, with a ``---`` line between samples."""
    cfg = _sampling_config(args)
    if args.num_samples < 1:
        raise SlmError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.num_samples > 1 and cfg.beams > 1:
        raise SlmError("beam search gives one answer: use --num-samples 1 with --beams")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = _load(args)
    out, t0 = sys.stdout, time.perf_counter()
    if args.num_samples == 1:
        out.write(prompt)
        out.flush()
        pieces = []
        for piece in stream(model, tokenizer, prompt, cfg):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        _report(len(tokenizer.encode("".join(pieces))), time.perf_counter() - t0)
        return 0
    gen = Generation(model, [tokenizer.encode(prompt)] * args.num_samples, cfg, tokenizer.eot_id)
    texts = [TextStream(tokenizer, cfg.stop) for _ in range(args.num_samples)]
    pieces: list[list[str]] = [[] for _ in range(args.num_samples)]
    printed = 0
    while printed < args.num_samples:
        for row, token in gen.step().items():
            pieces[row].append(texts[row].push(token))
            if texts[row].stopped:
                gen.finish(row)
        while printed < args.num_samples and gen.done[printed]:
            if printed:
                out.write("---\n")
            out.write(prompt + "".join(pieces[printed]) + texts[printed].finish() + "\n")
            out.flush()
            printed += 1
    _report(sum(len(t) for t in gen.tokens), time.perf_counter() - t0)
    return 0


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-history", action="store_true", help="continue each line on its own, not the whole transcript")
    _add_common_arguments(parser)


CHAT_HELP = ("Type text and the model continues it; the conversation so far is the context. "
             "Empty line: continue. /reset: start over. /quit or Ctrl-D: leave. Ctrl-C: stop a reply.")


def run_chat(args: argparse.Namespace) -> int:
    """``slm chat``: an interactive loop for a base model. Each line you type is added to a
    rolling transcript (the last ``block_size`` tokens are what the model sees) and the model's
    continuation is streamed and added too; ``--no-history`` continues each line on its own."""
    cfg = _sampling_config(args)
    model, tokenizer = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    transcript, max_chars = "", 8 * model.config.block_size  # far more text than the context holds
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
            print()
            continue
        command = line.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            transcript = ""
            continue
        if args.no_history:
            transcript = ""
        transcript = (transcript + ("\n" if transcript and line else "") + line)[-max_chars:]
        pieces = []
        try:
            with warnings.catch_warnings():  # the transcript outgrowing the context is expected
                warnings.simplefilter("ignore")
                for piece in stream(model, tokenizer, transcript, cfg):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    pieces.append(piece)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        transcript += "".join(pieces)
