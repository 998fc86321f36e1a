"""The CLI: ``slm generate`` and ``slm chat``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator

import torch

from slmkit.config import RUN_SECTIONS, add_section_arguments, check_sections, load_toml, section_from_args
from slmkit.errors import SlmError
from slmkit.generate.conversation import NO_TEMPLATE, ChatSession, stream_reply
from slmkit.generate.generation import Generation
from slmkit.generate.sampling import SamplingConfig
from slmkit.generate.text import TextStream, stream, stream_ids
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
    parser.add_argument("--prompt", default="", help="text to continue ('-' reads stdin; default: a new document); "
                        "with --chat, the user's message")
    parser.add_argument("--chat", action="store_true",
                        help="the prompt is one user message, rendered with the run's chat template; print only the reply")
    parser.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system prompt")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the prompt, generated as one batch (default 1)")
    _add_common_arguments(parser)


def _report(tokens: int, seconds: float) -> None:
    if sys.stderr.isatty():
        print(f"[{tokens} tokens in {seconds:.1f}s, {tokens / max(seconds, 1e-9):.0f} tokens/s]", file=sys.stderr)


def _system_turns(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("system", args.system)] if args.system else []


def run_generate(args: argparse.Namespace) -> int:
    """``slm generate``: print the prompt and its continuation as it is produced. With
    ``--num-samples N`` the samples are generated as one batch (N times the throughput) and each
    is printed, in order, as soon as it is complete, with a ``---`` line between samples.
    With ``--chat`` the prompt is one user message (after ``--system``) rendered with the run's
    chat template, and only the reply is printed, up to the template's end token."""
    cfg = _sampling_config(args)
    if args.num_samples < 1:
        raise SlmError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.num_samples > 1 and cfg.beams > 1:
        raise SlmError("beam search gives one answer: use --num-samples 1 with --beams")
    if args.system is not None and not args.chat:
        raise SlmError("--system is a chat option: add --chat (the run needs a chat template)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = _load(args)
    out, t0 = sys.stdout, time.perf_counter()
    stop_ids, hidden, prefix = (), (), prompt
    if args.chat:
        session = ChatSession(tokenizer, f"run {args.run_dir}")
        turns = _system_turns(args) + [("user", prompt)]
        ids = session.prompt(turns, model.config.block_size, cfg.max_new_tokens).ids
        stop_ids, hidden, prefix = session.stop_ids, session.hidden, ""
    else:
        ids = tokenizer.encode(prompt)
    if args.num_samples == 1:
        out.write(prefix)
        out.flush()
        pieces = []
        for piece in stream_ids(model, tokenizer, ids, cfg, stop_ids=stop_ids, hidden=hidden):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        _report(len(tokenizer.encode("".join(pieces))), time.perf_counter() - t0)
        return 0
    gen = Generation(model, [ids] * args.num_samples, cfg, tokenizer.eot_id, stop_ids=stop_ids)
    texts = [TextStream(tokenizer, cfg.stop, hidden) for _ in range(args.num_samples)]
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
            out.write(prefix + "".join(pieces[printed]) + texts[printed].finish() + "\n")
            out.flush()
            printed += 1
    _report(sum(len(t) for t in gen.tokens), time.perf_counter() - t0)
    return 0


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="a system prompt (runs with a chat template, i.e. fine-tuned on chat records)")
    parser.add_argument("--no-history", action="store_true", help="answer each line on its own, not the whole conversation")
    _add_common_arguments(parser)


CHAT_HELP = ("Type text and the model continues it; the conversation so far is the context. "
             "Empty line: continue. /reset: start over. /quit or Ctrl-D: leave. Ctrl-C: stop a reply.")
TEMPLATE_HELP = ("Type a message and the model replies (chat template {name}). /reset: a new conversation. "
                 "/quit or Ctrl-D: leave. Ctrl-C: stop a reply.")


def _read_line(interactive: bool) -> str | None:
    """The next line typed, None at the end of input; Ctrl-C at the prompt gives a fresh prompt."""
    while True:
        try:
            return input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return None
        except KeyboardInterrupt:  # at the prompt: a fresh line, like a shell
            print()


def _stream_out(pieces: Iterator[str]) -> str:
    """Print the pieces as they come; Ctrl-C stops the reply (the part shown is kept)."""
    shown = []
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            shown.append(piece)
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(shown)


def run_chat(args: argparse.Namespace) -> int:
    """``slm chat``: an interactive loop. A run with a chat template (fine-tuned on chat records)
    gets a conversation: each line is a user turn, the reply is generated with the template up to
    its end token, and the oldest turns are dropped (with a note) when the context fills up. A
    base model continues a rolling transcript instead (the last ``block_size`` tokens are what
    the model sees); ``--no-history`` answers or continues each line on its own."""
    cfg = _sampling_config(args)
    model, tokenizer = _load(args)
    if getattr(tokenizer, "chat_template", None) is not None:
        return _chat_with_template(args, cfg, model, tokenizer)
    if args.system is not None:
        raise SlmError(f"--system: run {args.run_dir} {NO_TEMPLATE}")
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    transcript, max_chars = "", 8 * model.config.block_size  # far more text than the context holds
    while (line := _read_line(interactive)) is not None:
        command = line.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            transcript = ""
            continue
        if args.no_history:
            transcript = ""
        transcript = (transcript + ("\n" if transcript and line else "") + line)[-max_chars:]
        with warnings.catch_warnings():  # the transcript outgrowing the context is expected
            warnings.simplefilter("ignore")
            transcript += _stream_out(stream(model, tokenizer, transcript, cfg))
    return 0


def _chat_with_template(args: argparse.Namespace, cfg: SamplingConfig, model, tokenizer) -> int:
    session = ChatSession(tokenizer, f"run {args.run_dir}")
    block = model.config.block_size
    interactive = sys.stdin.isatty()
    if interactive:
        print(TEMPLATE_HELP.format(name=session.template.get("name", "")), file=sys.stderr)
    system, history = _system_turns(args), []
    while (line := _read_line(interactive)) is not None:
        command = line.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            history = []
            continue
        if not command:
            continue
        if args.no_history:
            history = []
        try:
            prompt = session.prompt(system + history + [("user", line)], block, cfg.max_new_tokens)
        except SlmError as e:  # one message too long: say so and let the user go on
            print(f"error: {e}", file=sys.stderr)
            continue
        if prompt.dropped:
            print(f"[history trimmed: the {prompt.dropped} oldest turn(s) no longer fit the context of "
                  f"{block} tokens]", file=sys.stderr)
        history = prompt.turns[len(system):]
        history.append(("assistant", _stream_out(stream_reply(model, session, prompt.ids, cfg))))
    return 0
