"""Prepare on chat records: ``slm prepare`` given chat/instruction JSONL writes an SFT DATA_DIR.

The records, the template and the rendering with its loss mask are ``slmkit.chat``'s; this module
reads the files, extends the base run's tokenizer with the template's tokens, renders every
conversation once and writes the folder atomically (``files.atomic_dir``). ``slmkit.data`` reads it
(``open_chat_split``, ``ChatBatches``). The folder::

    train.bin, val.bin                 the examples' tokens, one after another (uint16/uint32)
    train_mask.bin, val_mask.bin       one uint8 per token: 1 = this token is a supervised target
    train_offsets.bin, val_offsets.bin int64, examples + 1 entries: example i is tokens[o[i]:o[i+1]]
    meta.json                          "kind": "chat", the template, counts (examples, tokens,
                                       supervised, cut, skipped), forms found, context, train_on
    tokenizer files                    the base tokenizer plus the template's special tokens
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from slmkit import __version__
from slmkit.chat import (
    DEFAULT_TEMPLATE,
    TRAIN_ON,
    Turn,
    add_chat_tokens,
    chat_template_jinja,
    is_chat_record,
    read_chat_jsonl,
    render_ids,
    show_example,
)
from slmkit.data import DATA_META, token_dtype
from slmkit.errors import SlmError
from slmkit.files import atomic_dir, sha256_file
from slmkit.tokenizer import META_FILE, load_tokenizer


def context_of(base: Path) -> int | None:
    """``[model] block_size`` of a run directory's ``config.toml`` (None for a data/tokenizer folder)."""
    import tomllib

    path = base / "config.toml"
    if not path.is_file():
        return None
    try:
        return int(tomllib.loads(path.read_text(encoding="utf-8"))["model"]["block_size"])
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError):
        raise SlmError(f"{path} has no readable [model] block_size: pass --context") from None


def _encode_split(convs, tok, template, train_on: str, context: int, dtype, tmp: Path, split: str) -> dict:
    """Render ``convs`` into ``<split>.bin``, ``_mask.bin``, ``_offsets.bin``; return the split's counts.

    An example needs at most ``context + 1`` tokens (inputs and targets are shifted by one); a
    longer one is cut there, and skipped when the cut leaves nothing supervised.
    """
    stats = {"examples": 0, "tokens": 0, "supervised": 0, "cut": 0, "skipped": 0}
    offsets = [0]
    with open(tmp / f"{split}.bin", "wb") as ft, open(tmp / f"{split}_mask.bin", "wb") as fm:
        for turns in convs:
            ids, mask = render_ids(turns, tok, template, train_on=train_on)
            if len(ids) > context + 1:
                ids, mask = ids[: context + 1], mask[: context + 1]
                if not any(mask[1:]):
                    stats["skipped"] += 1
                    continue
                stats["cut"] += 1
            np.asarray(ids, dtype=dtype).tofile(ft)
            np.asarray(mask, dtype=np.uint8).tofile(fm)
            offsets.append(offsets[-1] + len(ids))
            stats["examples"] += 1
            stats["supervised"] += sum(mask[1:])  # the first token is never a target
    np.asarray(offsets, dtype=np.int64).tofile(tmp / f"{split}_offsets.bin")
    stats["tokens"] = offsets[-1]
    if stats["examples"] == 0:
        raise SlmError(f"no {split} example fits the context of {context} tokens: pass a larger --context")
    return stats


def prepare_chat(
    files: list[Path], val_files: list[Path], out_dir: Path, tokenizer_from: Path, *, val_fraction: float = 0.05,
    seed: int = 1337, train_on: str = "all", context: int | None = None, template: dict = DEFAULT_TEMPLATE,
) -> tuple[dict, list[tuple[list[int], list[bool]]]]:
    """Write the SFT DATA_DIR ``out_dir`` (atomically) from chat JSONL files; return its meta and
    the first few rendered training examples (ids, mask) for ``--show``.

    ``tokenizer_from``: the base run (or data/tokenizer folder) whose tokenizer is extended with the
    template's tokens. ``context``: the longest example in tokens, default the base run's block_size.
    """
    if train_on not in TRAIN_ON:
        raise SlmError(f"--train-on {train_on!r} is not known: choose all or last")
    tok_dir = next((d for d in (tokenizer_from, tokenizer_from / "tokenizer") if (d / META_FILE).is_file()), None)
    if tok_dir is None:
        raise SlmError(f"{tokenizer_from} has no tokenizer ({META_FILE}): give the base run directory")
    context = context or context_of(tokenizer_from)
    if not context or context < 1:
        raise SlmError(f"{tokenizer_from} is not a run directory, so the context is unknown: pass --context N")
    for p in files + val_files:
        if p.suffix.lower() != ".jsonl":
            raise SlmError(f"{p} is not .jsonl: chat records are read from JSONL files only")
    base = load_tokenizer(tok_dir)
    tok = add_chat_tokens(base, template)

    forms: Counter = Counter()

    def read(paths: list[Path]) -> list[list[Turn]]:
        convs = []
        for p in paths:
            c, f = read_chat_jsonl(p)
            convs += c
            forms.update(f)
        return convs

    train, val = read(files), read(val_files)
    if not val:
        if not 0 < val_fraction < 1:
            raise SlmError(f"val_fraction {val_fraction} must be between 0 and 1 (e.g. 0.05)")
        if len(train) < 2:
            raise SlmError(f"{files[0]} holds {len(train)} conversation(s): at least 2 are needed for train and val")
        n_val = min(len(train) - 1, max(1, round(len(train) * val_fraction)))
        is_val = np.zeros(len(train), dtype=bool)
        is_val[np.random.default_rng(seed).choice(len(train), size=n_val, replace=False)] = True
        train, val = [c for c, v in zip(train, is_val) if not v], [c for c, v in zip(train, is_val) if v]

    dtype = token_dtype(tok.vocab_size)
    with atomic_dir(out_dir) as tmp:
        stats = {s: _encode_split(c, tok, template, train_on, context, dtype, tmp, s)
                 for s, c in (("train", train), ("val", val))}
        tok.save(tmp)
        sources = files + val_files
        meta = {
            "kind": "chat",
            "vocab_size": tok.vocab_size,
            "base_vocab_size": base.vocab_size,
            "dtype": np.dtype(dtype).name,
            "tokenizer": tok.kind,
            "eot_id": tok.eot_id,
            "template": template,
            "chat_template": chat_template_jinja(template),
            "train_on": train_on,
            "context": context,
            "forms": dict(sorted(forms.items())),
            "train": stats["train"],
            "val": stats["val"],
            "val_fraction": None if val_files else val_fraction,
            "seed": seed,
            "tokenizer_from": str(tokenizer_from),
            "sources": [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sources],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "slmkit_version": __version__,
        }
        (tmp / DATA_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shown = [render_ids(t, tok, template, train_on=train_on) for t in train[:16]]
    return meta, shown


def print_summary(meta: dict, out: str | Path) -> None:
    """What ``slm prepare`` prints after writing an SFT DATA_DIR."""
    forms = ", ".join(f"{n:,} {form}" for form, n in meta["forms"].items())
    print(f"found {forms} records")
    for split in ("train", "val"):
        m = meta[split]
        print(f"{split:5s} {m['examples']:>9,} examples {m['tokens']:>12,} tokens {m['supervised']:>12,} supervised"
              f"   cut {m['cut']:,} skipped {m['skipped']:,} (context {meta['context']})")
    added = meta["vocab_size"] - meta["base_vocab_size"]
    print(f"wrote {out} (chat, vocab {meta['vocab_size']}: {added} chat token(s) added, train on {meta['train_on']})")


def first_record_is_chat(files: list[Path]) -> bool:
    """Whether the first non-empty line of the first ``.jsonl`` file is a chat record (not ``{"text"}``)."""
    for path in files:
        if path.suffix.lower() != ".jsonl":
            continue
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    try:
                        return is_chat_record(json.loads(raw.decode("utf-8").removeprefix("\ufeff")))
                    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                        return False  # the plain reader reports the bad line
    return False


def run_prepare_cli(args, files: list[Path], val_files: list[Path]) -> int:
    """``slm prepare`` on chat records: write the SFT DATA_DIR, print its counts and ``--show`` examples."""
    if not args.tokenizer_from:
        raise SlmError(f"{files[0]} holds chat records: pass --tokenizer-from BASE_RUN (the run to fine-tune)")
    if args.show < 0:
        raise SlmError(f"--show {args.show} must be 0 or more")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").exists())):
        raise SlmError(f"{out} exists and is not an empty or data directory: choose a new output folder")
    meta, shown = prepare_chat(files, val_files, out, Path(args.tokenizer_from), val_fraction=args.val_fraction,
                               seed=args.seed, train_on=args.train_on, context=args.context)
    if args.show:
        tok = load_tokenizer(out)
        for i, (ids, mask) in enumerate(shown[: args.show]):
            print(f"--- example {i} ({len(ids)} tokens, {sum(mask[1:])} supervised) ---")
            print(show_example(ids, mask, tok))
    print_summary(meta, out)
    return 0


__all__ = ["context_of", "first_record_is_chat", "prepare_chat", "print_summary", "run_prepare_cli"]
