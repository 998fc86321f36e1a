"""``slm quantize RUN --out RUN_Q [--bits 8|4|16] [--group 32] [--embeddings] [--calibrate N --data DATA_DIR]``: a smaller RUN_DIR.

The new run's checkpoints hold the chosen weights packed as int8 or int4 blocks (GGUF's q8_0 /
q4_0 layout at groups of 32, see ``slmkit.quant``), or every matrix as bf16 (``--bits 16``), in
``model.safetensors`` and say how in ``quantization.json``; everything else (config, tokenizer,
chat template) is the original run's. The C++ decode step reads int8/int4 blocks and bf16
matrices as they are stored (``slmkit.decode.native``), so such a run decodes faster by default.
``slm generate``, ``slm chat``, ``slm eval``, ``slm export`` and ``load_run`` read it like any run:
the blocks are unpacked to the float32 values they stand for when the checkpoint is read, so every
decode backend runs it and the quality measured is the quantized weights' quality.

``--calibrate N --data DATA_DIR`` first folds activation-aware scales (``quant.apply_awq``) into
the model, searched on N random windows of DATA_DIR's train split (the run's tokenizer's data;
the val split stays unseen for measuring): still a plain model of the same shape, so the blocks,
``--format gguf --outtype q4_0`` of the quantized run and every command read it as before.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slmkit.config import add_section_arguments, section_from_args
from slmkit.errors import SlmError
from slmkit.quant import QuantConfig, apply_awq, quantize_weights

CALIBRATION_LENGTH = 256  # tokens per calibration window (the context, when shorter)


def calibration_tokens(data_dir: str | Path, n: int, block_size: int, vocab_size: int, seed: int = 0):
    """``n`` random windows (n, min(block_size, 256)) of DATA_DIR's train split, as int64 tokens;
    one SlmError line when the data is not token data of this vocabulary or is too short."""
    import numpy as np
    import torch

    from slmkit.data import load_meta, open_split

    meta = load_meta(data_dir)
    if meta.get("kind") == "chat":
        raise SlmError(f"--data {data_dir} is chat (SFT) data: calibrate on the plain-text DATA_DIR the run was trained on")
    if int(meta.get("vocab_size", -1)) > vocab_size:
        raise SlmError(f"--data {data_dir} has a vocabulary of {meta.get('vocab_size')} tokens, the run {vocab_size}: "
                       "calibrate on data prepared with the run's tokenizer")
    train = open_split(data_dir, "train")
    length = min(block_size, CALIBRATION_LENGTH)
    if len(train) <= length:
        raise SlmError(f"--data {data_dir}'s train split has {len(train)} tokens, too few for {length}-token windows")
    starts = np.random.default_rng(seed).integers(0, len(train) - length, size=n)
    return torch.from_numpy(np.stack([np.asarray(train[i:i + length], dtype=np.int64) for i in starts]))


def quantize_run(run_dir: str | Path, out: str | Path, cfg: QuantConfig, which: str = "best",
                 data: str | Path | None = None) -> Path:
    """Write RUN_DIR's ``best`` (or ``last``) checkpoint, quantized by ``cfg``, as the new RUN_DIR
    ``out``; with ``cfg.calibrate``, activation-aware scales from DATA_DIR ``data`` first."""
    from slmkit.checkpoint import load_run
    from slmkit.export.run import run_train_config
    from slmkit.rundir import create_run

    cfg.validate()
    if cfg.calibrate and data is None:
        raise SlmError("--calibrate needs --data DATA_DIR: the data the run was trained on (its train split)")
    if data is not None and not cfg.calibrate:
        raise SlmError("--data is read only for --calibrate N (activation-aware scales): add --calibrate 256")
    model, tokenizer, info = load_run(run_dir, which=which)
    if "quantized_from" in info:
        raise SlmError(f"{run_dir} is already quantized (from {info['quantized_from']}): quantize the original run")
    if cfg.calibrate:
        apply_awq(model, calibration_tokens(data, cfg.calibrate, model.config.block_size, model.config.vocab_size), cfg)
    weights, meta = quantize_weights(model, cfg)
    return create_run(out, model, tokenizer, run_train_config(run_dir), weights=weights, quantization=meta,
                      quantized_from=str(Path(run_dir).resolve()), quantized_step=info.get("step"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    parser.add_argument("--out", required=True, help="new RUN_DIR to create")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to quantize")
    add_section_arguments(parser, QuantConfig)
    parser.add_argument("--data", help="DATA_DIR the run was trained on, for --calibrate (its train split)")


def run_cli(args: argparse.Namespace) -> int:
    cfg = section_from_args(QuantConfig, args, "quantize")
    out = quantize_run(args.run_dir, args.out, cfg, args.which, data=args.data)
    before = (Path(args.run_dir) / args.which / "model.safetensors")
    if not before.is_file():
        before = Path(args.run_dir) / "last" / "model.safetensors"
    after = out / "last" / "model.safetensors"
    group = "per output channel" if cfg.group == 0 else f"groups of {cfg.group}"
    how = ("bf16 (every matrix, embeddings and head included)" if cfg.bits == 16 else
           f"int{cfg.bits} ({group}{', embeddings too' if cfg.embeddings else ''}"
           f"{f', activation-aware scales from {cfg.calibrate} sequences' if cfg.calibrate else ''})")
    print(f"quantized {args.run_dir} to {how} into {out}: "
          f"model.safetensors {before.stat().st_size / 1e6:.2f} MB -> {after.stat().st_size / 1e6:.2f} MB")
    return 0
