"""``slm quickstart``: prepare a corpus, train a few minutes, print samples. Works offline.

It uses TinyStories' validation file from the Hugging Face Hub (19 MB, 22k short stories) when the
Hub can be reached, and otherwise text that ships with every Python installation (the pydoc topics
and standard-library docstrings), and says which one it used. ``--max-time`` (default 5m) and
``--max-steps`` shorten the training: ``slm quickstart --source builtin --max-steps 20`` checks the
whole path offline in about 15 seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slmkit.errors import SlmError

TINYSTORIES = "hf:roneneldan/TinyStories/TinyStories-valid.txt"
PROMPTS = {"tinystories": ["Once upon a time", "Lily and Ben", "The little dog"],
           "builtin": ["The function", "Return the", "This module"]}
SAMPLING = {"max_new_tokens": 80, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 0}  # SamplingConfig's


def _corpus(source: str, work: Path) -> tuple[str, list[str]]:
    """Return (name, input paths) for prepare: TinyStories if reachable, else the built-in corpus."""
    from slmkit.prepare import builtin_corpus, read_documents

    if source in ("auto", "tinystories"):
        try:
            read_documents([TINYSTORIES])  # downloads into the Hub cache, or fails fast when offline
            return "tinystories", [TINYSTORIES]
        except SlmError as e:
            if source == "tinystories":
                raise
            print(f"TinyStories not reachable ({e}); using the built-in corpus instead", file=sys.stderr)
    path = work / "builtin_corpus.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(doc + "\n<|endoftext|>\n" for doc in builtin_corpus()), encoding="utf-8")
    return "builtin", [str(path)]


def quickstart(out: str | Path = "slm-quickstart", max_time: str = "5m", source: str = "auto",
               vocab_size: int = 2048, num_samples: int = 3, max_steps: int | None = None) -> list[str]:
    """Run the demo into ``out`` and return the samples it printed. Training stops at ``max_time``
    or after ``max_steps`` steps (the preset's 2000 when None), whichever comes first."""
    if max_steps is not None and max_steps <= 0:
        raise SlmError(f"--max-steps must be positive, got {max_steps}")
    from slmkit.prepare import prepare
    from slmkit.generate import SamplingConfig, generate
    from slmkit.checkpoint import load_run
    from slmkit.train import train

    out = Path(out)
    t0 = time.time()
    name, inputs = _corpus(source, out)
    print(f"[1/3] corpus: {'TinyStories (validation file from the Hub)' if name == 'tinystories' else 'built-in Python documentation text (offline)'}",
          file=sys.stderr)
    meta = prepare(inputs, out / "data", vocab_size=vocab_size, val_fraction=0.05)
    print(f"      {meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens, vocab {meta['vocab_size']}",
          file=sys.stderr)
    steps = f" or {max_steps} steps" if max_steps else ""
    print(f"[2/3] training the 'quickstart' preset for {max_time}{steps}", file=sys.stderr)
    overrides = [f"train.max_steps={max_steps}"] if max_steps else []
    train(out / "data", out / "run", preset="quickstart", overrides=overrides, max_time=max_time, fresh=True)
    print("[3/3] samples", file=sys.stderr)
    model, tokenizer, _ = load_run(out / "run")
    cfg = SamplingConfig(**SAMPLING)
    prompts = PROMPTS[name][:num_samples]
    samples = generate(model, tokenizer, prompts, cfg)
    for prompt, text in zip(prompts, samples):
        print(f"--- {prompt}{text}")
    print(f"done in {time.time() - t0:.0f}s. Try: slm generate {out / 'run'} --prompt \"{prompts[0]}\"", file=sys.stderr)
    return samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="slm-quickstart", help="folder for the data and the run")
    parser.add_argument("--max-time", default="5m", help="training time (default 5m)")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps if sooner (a quick check: 20)")
    parser.add_argument("--source", default="auto", choices=["auto", "tinystories", "builtin"],
                        help="auto: TinyStories from the Hub when reachable, else the built-in corpus")


def run_cli(args: argparse.Namespace) -> int:
    quickstart(args.out, args.max_time, args.source, max_steps=args.max_steps)
    return 0
