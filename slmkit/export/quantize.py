"""``slm quantize RUN --out RUN_Q [--bits 8|4] [--group 32] [--embeddings]``: a smaller RUN_DIR.

The new run's checkpoints hold the chosen weights packed as int8 or int4 blocks (GGUF's q8_0 /
q4_0 layout at groups of 32, see ``slmkit.quant``) in ``model.safetensors`` and say how in
``quantization.json``; everything else (config, tokenizer, chat template) is the original run's.
``slm generate``, ``slm chat``, ``slm eval``, ``slm export`` and ``load_run`` read it like any run:
the blocks are unpacked to the float32 values they stand for when the checkpoint is read, so every
decode backend runs it and the quality measured is the quantized weights' quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slmkit.config import add_section_arguments, from_dict, load_toml, section_from_args
from slmkit.errors import SlmError
from slmkit.quant import QuantConfig, quantize_weights


def quantize_run(run_dir: str | Path, out: str | Path, cfg: QuantConfig, which: str = "best") -> Path:
    """Write RUN_DIR's ``best`` (or ``last``) checkpoint, quantized by ``cfg``, as the new RUN_DIR ``out``."""
    from slmkit.checkpoint import load_run
    from slmkit.rundir import create_run
    from slmkit.train import TrainConfig

    cfg.validate()
    model, tokenizer, info = load_run(run_dir, which=which)
    if "quantized_from" in info:
        raise SlmError(f"{run_dir} is already quantized (from {info['quantized_from']}): quantize the original run")
    weights, meta = quantize_weights(model, cfg)
    config_path = Path(run_dir) / "config.toml"
    train_section = load_toml(config_path).get("train", {}) if config_path.is_file() else {}
    train_cfg = from_dict(TrainConfig, train_section, "train")
    return create_run(out, model, tokenizer, train_cfg, weights=weights, quantization=meta,
                      quantized_from=str(Path(run_dir).resolve()), quantized_step=info.get("step"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="RUN_DIR written by slm train")
    parser.add_argument("--out", required=True, help="new RUN_DIR to create")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to quantize")
    add_section_arguments(parser, QuantConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = section_from_args(QuantConfig, args, "quantize")
    out = quantize_run(args.run_dir, args.out, cfg, args.which)
    before = (Path(args.run_dir) / args.which / "model.safetensors")
    if not before.is_file():
        before = Path(args.run_dir) / "last" / "model.safetensors"
    after = out / "last" / "model.safetensors"
    group = "per output channel" if cfg.group == 0 else f"groups of {cfg.group}"
    print(f"quantized {args.run_dir} to int{cfg.bits} ({group}{', embeddings too' if cfg.embeddings else ''}) "
          f"into {out}: model.safetensors {before.stat().st_size / 1e6:.2f} MB -> {after.stat().st_size / 1e6:.2f} MB")
    return 0
