"""Evaluation: loss, perplexity, bits per byte and next-token accuracy of a trained model.

Loss and perplexity are per target token, ``<|endoftext|>`` included. Bits per byte is the nats
of the text targets / ln 2 / the UTF-8 bytes they stand for (special tokens have no bytes and are
left out, as in lm-eval-harness and nanochat: see ``slmkit.scoring``). Unlike loss per token it
does not depend on the tokenizer, so a 512-token and a 50k-token model compare fairly.
On an SFT DATA_DIR (``slm prepare`` of chat records) only the supervised targets are scored: the
responses and their end tokens, as fine-tuning's validation scores them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.data import load_meta, open_chat_split, open_split
from slmkit.errors import SlmError
from slmkit.prepare import read_documents
from slmkit.runtime import resolve_device
from slmkit.scoring import evaluate_chat, evaluate_tokens  # the one evaluator; slm eval's name for it, kept for callers


def evaluate_run(
    run_dir: str | Path, *, data_dir: str | Path | None = None, input_path: str | None = None,
    which: str = "best", device: str = "cpu", batch_size: int = 8,
) -> dict[str, Any]:
    """Evaluate RUN_DIR's model on a data dir's val split or on a text/jsonl file."""
    from slmkit.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir, device=device, which=which)
    if (data_dir is None) == (input_path is None):
        raise SlmError("pass exactly one of --data DATA_DIR or --input TEXTFILE")
    if data_dir is not None:
        meta = load_meta(data_dir)
        if meta.get("kind") == "chat" and meta.get("base_vocab_size") == model.config.vocab_size < meta["vocab_size"]:
            # A base model on the SFT set made from it: the chat tokens start as fine-tuning starts them.
            from slmkit.chat import grow_embeddings
            from slmkit.tokenizer import load_tokenizer

            grow_embeddings(model, meta["vocab_size"])
            tokenizer = load_tokenizer(data_dir)
        if meta["vocab_size"] != model.config.vocab_size:
            raise SlmError(
                f"{data_dir} has vocab {meta['vocab_size']} but the model in {run_dir} has "
                f"{model.config.vocab_size}: evaluate on data prepared with the run's tokenizer (or use --input)"
            )
        source = f"{data_dir} (val)"
        if meta.get("kind") == "chat":  # responses only
            metrics = evaluate_chat(model, open_chat_split(data_dir, "val"), tokenizer.token_byte_lengths(),
                                    pad_id=tokenizer.eot_id, batch_size=batch_size, device=device)
            return {"source": source, "supervised_only": True, **metrics}
        tokens = open_split(data_dir, "val")
    else:
        docs = list(read_documents([input_path]))
        ids: list[int] = []
        for doc_ids in tokenizer.encode_batch(docs):
            ids.extend(doc_ids)
            ids.append(tokenizer.eot_id)
        tokens = np.asarray(ids, dtype=np.int64)
        source = input_path
    metrics = evaluate_tokens(model, tokens, tokenizer.token_byte_lengths(), batch_size=batch_size, device=device)
    return {"source": str(source), **metrics}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    parser.add_argument("--data", help="DATA_DIR: evaluate on its val split (an SFT DATA_DIR: on the responses only)")
    parser.add_argument("--input", help="a .txt/.jsonl file: evaluate on its text")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to evaluate")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run_cli(args: argparse.Namespace) -> int:
    metrics = evaluate_run(args.run_dir, data_dir=args.data, input_path=args.input, which=args.which,
                           device=resolve_device(args.device), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(metrics))
    else:
        scored = "supervised tokens (responses)" if metrics.get("supervised_only") else "tokens"
        print(f"evaluated {metrics['tokens']:,} {scored} of {metrics['source']}")
        what = "responses and their end tokens only" if metrics.get("supervised_only") else "every token, <|endoftext|> included"
        print(f"loss        {metrics['loss']:.4f} nats/token ({what})")
        print(f"perplexity  {metrics['perplexity']:.3f}")
        print(f"bits/byte   {metrics['bpb']:.4f} (text tokens over their bytes)")
        print(f"accuracy    {metrics['accuracy']:.2%}")
    return 0
