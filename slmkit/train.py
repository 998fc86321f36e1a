"""Pretraining: ``slm train`` and ``train()``, the whole stage.

``resolve_config`` merges preset, config file and overrides into validated ``[model]``/``[train]``
sections; ``build_pretraining`` assembles the parts the training loop (``slmkit.trainer``) is handed:
a GPT from ``[model]``, ``TokenBatches`` over DATA_DIR's train split and validation on its val split;
``train`` sets up RUN_DIR and runs it. A RUN_DIR holds ``config.toml`` (the resolved config),
``tokenizer/``, ``last/`` and ``best/`` checkpoints, ``metrics.jsonl`` and ``loss.png``. Running again
on the same RUN_DIR resumes from ``last/`` exactly: model, optimizer, schedule, step, RNG and data
position.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.config import RUN_SECTIONS, check_sections, from_dict, load_preset, load_toml, merge, parse_overrides, to_dict
from slmkit.data import TokenBatches, check_context_fits, load_meta, open_split
from slmkit.distributed import Dist, init_distributed, leave_distributed, split_batch
from slmkit.errors import SlmError, run_command
from slmkit.model import GPT, ModelConfig
from slmkit.rundir import setup_run_dir_on_rank0
from slmkit.runtime import choose_dtype, describe_dtype, pick_dtype, resolve_device
from slmkit.schedules import LRSchedule
from slmkit.scoring import evaluate_tokens
from slmkit.tokenizer import load_tokenizer
from slmkit.trainer import Evaluator, TrainConfig, Trainer, make_optimizer

# LRSchedule, TrainConfig, Trainer and make_optimizer were defined here before the loop and the
# schedules had their own modules; they are still importable from here.
__all__ = ["LRSchedule", "TrainConfig", "Trainer", "build_pretraining", "make_optimizer", "resolve_config", "train",
           "validation"]


# --------------------------------------------------------------------------- config resolution

def resolve_config(
    data_dir: Path, preset: str | None = None, config_file: str | None = None, overrides: list[str] | None = None,
    max_time: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Merge preset, config file, overrides and the data's vocab size into validated sections."""
    sections: dict[str, Any] = {"model": {}, "train": {}}
    if preset:
        sections = merge(sections, load_preset(preset))
    if config_file:
        from_file = load_toml(config_file)
        check_sections(from_file, RUN_SECTIONS, config_file)
        for other in ("sample", "serve", "finetune", "lora"):  # the other commands' sections: one run file serves all
            from_file.pop(other, None)
        sections = merge(sections, from_file)
    sections = merge(sections, parse_overrides(overrides or []))
    unknown = set(sections) - {"model", "train"}
    if unknown:
        raise SlmError(f"unknown config section [{sorted(unknown)[0]}]: only [model] and [train] exist")
    for name, table in sections.items():
        if not isinstance(table, dict):
            raise SlmError(f"config section [{name}] must be a table of key = value pairs, not a {type(table).__name__}")
    if max_time is not None:
        sections["train"]["max_time"] = max_time
    meta = load_meta(data_dir)
    given = sections["model"].get("vocab_size")
    if given is not None and given != meta["vocab_size"]:
        raise SlmError(
            f"model.vocab_size={given} but the data in {data_dir} has vocab {meta['vocab_size']}: drop the override"
        )
    sections["model"]["vocab_size"] = meta["vocab_size"]
    model_cfg = from_dict(ModelConfig, sections["model"], "model")
    train_cfg = from_dict(TrainConfig, sections["train"], "train")
    # Everything that can be checked without training is checked now, before RUN_DIR is touched.
    check_context_fits(data_dir, meta, model_cfg.block_size)
    device = resolve_device(train_cfg.device, setting="train.device={}")
    pick_dtype(train_cfg.dtype, device)
    check_memory(model_cfg, device)
    return {"model": to_dict(model_cfg), "train": to_dict(train_cfg)}


def check_memory(c: ModelConfig, device: str) -> None:
    """Refuse a model that cannot fit in RAM, rather than swap until the OOM killer comes.

    The model is always built on the CPU first (4 bytes a parameter); training on the CPU also
    holds gradients and AdamW's two moments (16 bytes a parameter).
    """
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf (Windows)
        return
    kv = c.kv_heads * c.head_dim
    per_layer = c.n_embd * (2 * c.n_embd + 2 * kv) + (3 if c.activation == "swiglu" else 2) * c.n_embd * c.hidden_dim
    n = c.n_layer * per_layer + c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    need = n * (16 if device == "cpu" else 4)
    if need > ram:
        raise SlmError(f"the model has about {n / 1e9:,.1f}B parameters and needs about {need / 2**30:,.0f} GiB of "
                       f"memory, more than the {ram / 2**30:,.0f} GiB here: make model.n_layer, n_embd or mlp_hidden smaller")


# --------------------------------------------------------------------------- the parts of a pretraining run


def validation(model: GPT, tokens: np.ndarray, token_bytes: list[int], cfg: TrainConfig, device: str,
               dtype: torch.dtype, dist: Dist) -> Evaluator:
    """The pretraining evaluator: loss over every target token and bits per byte (text tokens over
    their bytes, ``slmkit.scoring``) on the first ``train.eval_batches`` batches of the val split,
    the ranks sharing the batches."""

    def evaluate() -> dict[str, float]:
        m = evaluate_tokens(model, tokens, token_bytes, batch_size=cfg.batch_size, max_batches=cfg.eval_batches,
                            device=device, dtype=dtype, dist=dist)
        return {"val_loss": m["loss"], "val_bpb": m["bpb"]}

    return evaluate


def build_pretraining(data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], resume: bool,
                      dist: Dist | None = None) -> Trainer:
    """A ``Trainer`` for pretraining on DATA_DIR: a GPT from ``[model]`` (seeded by ``train.seed``),
    this rank's ``TokenBatches`` of the train split and ``validation`` on the val split."""
    dist = dist or Dist()
    model_cfg = from_dict(ModelConfig, sections["model"], "model")
    cfg = from_dict(TrainConfig, sections["train"], "train")
    token_bytes = load_tokenizer(data_dir).token_byte_lengths()
    device = resolve_device(cfg.device, setting="train.device={}")
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    micro_batch, _ = split_batch(cfg.batch_size, cfg.grad_accum, dist.world_size)
    batches = TokenBatches(open_split(data_dir, "train"), model_cfg.block_size, micro_batch, cfg.seed,
                           dist.rank, dist.world_size)
    evaluator = validation(model, open_split(data_dir, "val"), token_bytes, cfg, device, dtype, dist)
    return Trainer(model, batches, evaluator, cfg, run_dir, device=device, dtype=dtype, dist=dist, resume=resume,
                   notes={"data_dir": str(data_dir)})


def train(
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    max_time: str | None = None,
    fresh: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a model on DATA_DIR into RUN_DIR; returns the summary dict."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    sections = resolve_config(data_dir, preset, config_file, overrides, max_time)
    run_dir_cfg = run_dir / "config.toml"
    if not preset and not config_file and run_dir_cfg.exists() and not fresh:
        # Resuming with no preset given: the run's own config is the base, overrides still apply.
        sections = resolve_config(data_dir, None, str(run_dir_cfg), overrides, max_time)
    dist = init_distributed(sections["train"].get("device", "auto"))
    lock = contextlib.ExitStack()  # rank 0 holds RUN_DIR's lock in it until the run ends
    trainer = None
    try:
        with lock:
            resume = setup_run_dir_on_rank0(data_dir, run_dir, sections, fresh, dist, lock)
            trainer = build_pretraining(data_dir, run_dir, sections, resume, dist)
            quiet = quiet or not dist.main
            if not quiet:
                n = trainer.model.num_params()
                what = f"resuming at step {trainer.state.step}" if resume else "starting"
                procs = f", {dist.world_size} processes" if dist.world_size > 1 else ""
                # e.g. "..., device cpu, bfloat16 autocast, float32 weights (train.dtype=auto: this CPU has AVX512-BF16)"
                why = choose_dtype(sections["train"]["dtype"], trainer.device)[1]
                print(f"{what}: {n / 1e6:.2f}M parameters, device {trainer.device}{procs}, "
                      f"{describe_dtype(trainer.dtype)} ({why})", file=sys.stderr)
            summary = trainer.run(quiet=quiet)
            dist.barrier()
    finally:
        trainer = None  # DDP's reducer holds the process group
        leave_distributed(dist)
    if not quiet:
        print(
            f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['time_s']:.0f}s "
            f"({summary['tok_per_s']:,.0f} tok/s), val loss {summary['val_loss']:.4f}, val bpb {summary['val_bpb']:.4f}, "
            f"MFU {summary['mfu']:.0%} of a measured {summary['peak_flops'] / 1e9:,.0f} GFLOP/s"
            + (f" (stopped by {summary['stopped_by']})" if summary["stopped_by"] else ""),
            file=sys.stderr,
        )
    return summary


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slm train`` (and of ``python -m slmkit.train``, which torchrun runs)."""
    parser.add_argument("--data", required=True, help="DATA_DIR written by slm prepare")
    parser.add_argument("--out", required=True, help="RUN_DIR for checkpoints, logs and plots")
    parser.add_argument("--preset", help="a shipped preset (tiny, quickstart, cpu-15min, stories260k, stories15m, ...)")
    parser.add_argument("--config", help="a TOML file with [model] and [train] sections ([sample], slm generate's, is ignored)")
    parser.add_argument("--max-time", help="stop after this much training time, e.g. 15m or 1h")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming RUN_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes on this machine (launches torchrun; one per GPU)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. model.n_layer=4 train.lr=1e-3")


def launch_torchrun(args: argparse.Namespace) -> int:
    """Run this same training as ``torchrun --standalone --nproc_per_node N -m slmkit.train ...``."""
    argv = ["--data", args.data, "--out", args.out]
    for flag, value in (("--preset", args.preset), ("--config", args.config), ("--max-time", args.max_time)):
        if value is not None:
            argv += [flag, value]
    argv += ["--fresh"] * args.fresh + ["--quiet"] * args.quiet + list(args.overrides)
    return run_torchrun("slmkit.train", argv, args.nproc)


def run_torchrun(module: str, argv: list[str], nproc: int) -> int:
    """Run ``python -m module *argv`` as ``nproc`` processes on this machine through torchrun;
    returns its exit code. Used by ``slm train --nproc`` and ``slm finetune --nproc``."""
    import subprocess

    env = dict(os.environ)
    if not torch.cuda.is_available():
        # CPU ranks share the cores; torchrun's default of one thread each is right only for many ranks.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its ranks, which checkpoint first
        return 130


def run_cli(args: argparse.Namespace) -> int:
    """``slm train``: train in this process, or launch ``--nproc`` processes through torchrun."""
    if args.nproc < 1:
        raise SlmError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_torchrun(args)
    summary = train(args.data, args.out, preset=args.preset, config_file=args.config, overrides=args.overrides,
                    max_time=args.max_time, fresh=args.fresh, quiet=args.quiet)
    return {"SIGINT": 130, "SIGTERM": 143}.get(summary["stopped_by"], 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m slmkit.train``: the arguments of ``slm train``; this is what torchrun launches."""
    parser = argparse.ArgumentParser(prog="python -m slmkit.train", description="train or resume a model in RUN_DIR")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run_cli(args))


if __name__ == "__main__":
    sys.exit(main())
