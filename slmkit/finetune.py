"""Fine-tuning: ``slm finetune BASE_RUN --data DATA_DIR --out RUN`` and ``finetune()``, the whole stage.

It builds the parts the training loop (``slmkit.trainer``) is handed, as pretraining does:

* the model: BASE_RUN's (``checkpoint.load_run``), its embedding grown for the chat tokens the SFT
  tokenizer added (``chat.grow_embeddings``), and with ``--lora`` adapters on it
  (``lora.apply_lora``; the base frozen, the new token rows trained too);
* the batches: an SFT DATA_DIR's examples (``data.ChatBatches``, packed best-fit into the context
  by default, ``finetune.pack=false`` for one example a row), or plain text prepared with the base
  run's tokenizer (``data.TokenBatches``: continued pretraining on domain text);
* the objective: the model's cross-entropy, or with ``--distill TEACHER_RUN`` the KL divergence
  from the teacher's logits (``prune.Distillation``, the recovery after ``slm prune``);
* the evaluator: on the val split, loss and accuracy over the supervised tokens
  (``scoring.evaluate_chat``, what ``slm eval --data SFT_DIR`` reports), or the pretraining one.

RUN is a run directory like ``slm train``'s (``rundir``): config.toml ([model] of the base, grown;
[train] with fine-tuning defaults; [finetune] with the base it started from; [lora]), tokenizer/
(DATA_DIR's, with the chat template), last/ and best/, metrics.jsonl, loss.png. Every checkpoint's
state.json records the base checkpoint and the sha256 of its weights. A LoRA run's checkpoints hold
only what trains (``lora.AdapterWeights``); ``load_run`` merges them into the base, so every
command reads a LoRA run as a plain model. RUN/adapter/ holds the adapter alone (``save_adapter``).
Running the same command again resumes exactly from last/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmkit.chat import grow_embeddings
from slmkit.checkpoint import load_run, read_checkpoint
from slmkit.config import (add_section_arguments, from_dict, load_toml, merge, parse_args_and_overrides,
                           parse_duration, parse_overrides, section_from_args, to_dict)
from slmkit.data import ChatBatches, TokenBatches, check_context_fits, load_meta, open_chat_split, open_split
from slmkit.distributed import Dist, init_distributed, leave_distributed, split_batch
from slmkit.errors import SlmError
from slmkit.files import sha256_file
from slmkit.lora import AdapterWeights, LoRAConfig, apply_lora, describe, save_adapter, train_new_tokens
from slmkit.model import GPT
from slmkit.prune import DistillConfig, Distillation
from slmkit.rundir import setup_run_dir_on_rank0
from slmkit.runtime import pick_dtype, resolve_device
from slmkit.scoring import evaluate_chat
from slmkit.tokenizer import META_FILE, Tokenizer, load_tokenizer
from slmkit.train import run_torchrun, validation
from slmkit.trainer import Evaluator, TrainConfig, Trainer

# [train] defaults of a fine-tune (train.* overrides still win): a lower learning rate than
# pretraining's 1e-3, a short warmup, frequent evaluation; a LoRA run learns its small adapters
# at a higher rate and without weight decay (it would pull the new token rows' neighbours too).
TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4, "min_lr_ratio": 0.1, "warmup_steps": 20, "max_steps": 500, "batch_size": 8, "weight_decay": 0.01,
    "eval_interval": 50, "eval_batches": 20, "checkpoint_interval": 50, "log_interval": 10,
}
LORA_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0}
TIMED_MAX_STEPS = 1_000_000  # with --max-time and no train.max_steps given: the budget ends the run


@dataclass
class FinetuneConfig:
    """The ``[finetune]`` section: how the data is batched, and the base the run started from
    (written by ``slm finetune``; a resume checks the base still holds the same weights)."""

    pack: bool = True  # SFT data: pack examples into the context (attention kept inside each); false: one a row
    lora: bool = False  # train LoRA adapters on the frozen base instead of every weight
    base_run: str = ""  # BASE_RUN as given
    base_checkpoint: str = ""  # the checkpoint folder the weights came from (BASE_RUN/best or last)
    base_sha256: str = ""  # of its model.safetensors
    base_vocab_size: int = 0  # the base's vocabulary; tokens from here on were added for chat
    which: str = field(default="best")  # the base checkpoint: best or last


# --------------------------------------------------------------------------- checks


def tokenizer_dir(run_dir: Path) -> Path:
    """BASE_RUN/tokenizer, or one clear line when the base run has none."""
    if not run_dir.is_dir():
        raise SlmError(f"base run {run_dir} does not exist: pass the --out folder of slm train")
    tok = run_dir / "tokenizer"
    if not (tok / META_FILE).is_file():
        raise SlmError(f"base run {run_dir} has no tokenizer (tokenizer/{META_FILE}): it cannot be fine-tuned; "
                       "train it with slm train, or import it with slm import-hf")
    return tok


def check_extends(base: Tokenizer, tok: Tokenizer, data_dir: Path, base_run: Path, *, same: bool) -> None:
    """Refuse DATA_DIR unless its tokenizer gives every base id the same bytes (and adds tokens only
    after them); ``same``: plain text data must use the base tokenizer itself."""
    n = base.vocab_size
    extends = tok.vocab_size >= n and tok.eot_id == base.eot_id
    if extends:
        ids = list(range(n))
        extends = (tok.token_byte_lengths()[:n] == base.token_byte_lengths()
                   and tok.decode_bytes(ids) == base.decode_bytes(ids)
                   and [i for i in tok.special_ids if i < n] == sorted(base.special_ids))
    if not extends or (same and tok.vocab_size != n):
        how = ("slm prepare --input FILE.jsonl --tokenizer-from " if not same
               else "slm prepare --input FILES --tokenizer-from ")
        raise SlmError(f"{data_dir} was not prepared with the tokenizer of {base_run}: run {how}{base_run} --out NEW_DIR")


# --------------------------------------------------------------------------- config


def resolve_sections(run_dir: Path, lora_cfg: LoRAConfig | None, overrides: list[str], max_time: str | None,
                     fresh: bool) -> dict[str, dict[str, Any]]:
    """[train] (fine-tuning defaults, RUN's config.toml when resuming, then overrides), [finetune]
    and [lora], validated. [model] is added from the base by the caller."""
    given = parse_overrides(overrides)
    unknown = set(given) - {"train", "finetune", "lora"}
    if unknown:
        what = sorted(unknown)[0]
        hint = "the model is the base run's" if what == "model" else "use train.*, finetune.* or lora.*"
        raise SlmError(f"[{what}] cannot be set by slm finetune: {hint}")
    sections: dict[str, Any] = {"train": dict(TRAIN_DEFAULTS), "finetune": {}}
    if lora_cfg is not None:
        sections["train"].update(LORA_TRAIN_DEFAULTS)
    old = run_dir / "config.toml"
    if old.is_file() and not fresh:  # resuming: the run's own settings, overrides on top
        previous = load_toml(old)
        was_lora = bool(previous.get("finetune", {}).get("lora"))
        if was_lora != (lora_cfg is not None):
            raise SlmError(f"{run_dir} holds a {'LoRA' if was_lora else 'full'} fine-tune: "
                           f"{'add' if was_lora else 'drop'} --lora to resume it, or use --fresh or another --out")
        sections["train"].update(previous.get("train", {}))
        sections["finetune"].update({k: v for k, v in previous.get("finetune", {}).items() if k == "pack"})
    sections = merge(sections, {k: v for k, v in given.items() if k != "lora"})
    if max_time is not None:
        sections["train"]["max_time"] = max_time
        if "max_steps" not in given.get("train", {}):  # the time budget decides, not the default step count
            sections["train"]["max_steps"] = TIMED_MAX_STEPS
    train_cfg = from_dict(TrainConfig, sections["train"], "train")
    ft = from_dict(FinetuneConfig, {**sections["finetune"], "lora": lora_cfg is not None}, "finetune")
    out = {"train": to_dict(train_cfg), "finetune": to_dict(ft)}
    if lora_cfg is not None:
        if given.get("lora"):
            lora_cfg = from_dict(LoRAConfig, {**to_dict(lora_cfg), **given["lora"]}, "lora")
        out["lora"] = to_dict(lora_cfg)
    elif given.get("lora"):
        raise SlmError("lora.* settings need --lora")
    return out


# --------------------------------------------------------------------------- the parts


def chat_validation(model: GPT, data_dir: Path, token_bytes: list[int], pad_id: int, cfg: TrainConfig, device: str,
                    dtype: torch.dtype, dist: Dist) -> Evaluator:
    """The fine-tuning evaluator: loss and accuracy over the supervised tokens of the first
    ``train.eval_batches`` batches of the SFT val split (``scoring.evaluate_chat``)."""
    split = open_chat_split(data_dir, "val")

    def evaluate() -> dict[str, float]:
        m = evaluate_chat(model, split, token_bytes, pad_id=pad_id, batch_size=cfg.batch_size,
                          max_batches=cfg.eval_batches, device=device, dtype=dtype, dist=dist)
        return {"val_loss": m["loss"], "val_acc": m["accuracy"]}

    return evaluate


def build_finetuning(model: GPT, data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], resume: bool,
                     dist: Dist | None = None) -> Trainer:
    """A ``Trainer`` for fine-tuning ``model`` (the base, its embedding already grown to DATA_DIR's
    vocabulary): adapters on it for a LoRA run, the batches of DATA_DIR's train split and
    validation on its val split."""
    dist = dist or Dist()
    cfg = from_dict(TrainConfig, sections["train"], "train")
    ft = from_dict(FinetuneConfig, sections["finetune"], "finetune")
    device = resolve_device(cfg.device, setting="train.device={}")
    dtype = pick_dtype(cfg.dtype, device)
    meta = load_meta(data_dir)
    tok = load_tokenizer(data_dir)
    model.train()
    torch.manual_seed(cfg.seed)  # the adapters' A matrices, then dropout
    weights = None
    if "lora" in sections:
        apply_lora(model, from_dict(LoRAConfig, sections["lora"], "lora"))
        if ft.base_vocab_size < model.config.vocab_size:
            train_new_tokens(model, ft.base_vocab_size)
        weights = AdapterWeights(model, first_new=ft.base_vocab_size)
    block = model.config.block_size
    micro_batch, _ = split_batch(cfg.batch_size, cfg.grad_accum, dist.world_size)
    token_bytes = tok.token_byte_lengths()
    if meta.get("kind") == "chat":
        batches = ChatBatches(open_chat_split(data_dir, "train"), block, micro_batch, cfg.seed, tok.eot_id,
                              dist.rank, dist.world_size, pack=ft.pack)
        evaluator = chat_validation(model, data_dir, token_bytes, tok.eot_id, cfg, device, dtype, dist)
    else:
        batches = TokenBatches(open_split(data_dir, "train"), block, micro_batch, cfg.seed, dist.rank, dist.world_size)
        evaluator = validation(model, open_split(data_dir, "val"), token_bytes, cfg, device, dtype, dist)
    objective = None
    if "distill" in sections:  # learn a teacher's logits (slm prune's recovery), see slmkit.prune
        distill = from_dict(DistillConfig, sections["distill"], "distill")
        objective = Distillation.from_run(distill, model.config.vocab_size, token_bytes, device)
    notes = {"data_dir": str(data_dir),
             "base": {"run": ft.base_run, "checkpoint": ft.base_checkpoint, "sha256": ft.base_sha256,
                      "vocab_size": ft.base_vocab_size}}
    if "lora" in sections:
        notes["lora"] = sections["lora"]
    if "distill" in sections:
        notes["distill"] = sections["distill"]
    return Trainer(model, batches, evaluator, cfg, run_dir, device=device, dtype=dtype, dist=dist, resume=resume,
                   notes=notes, weights=weights, objective=objective)


# --------------------------------------------------------------------------- the stage


def finetune(
    base_run: str | Path, data_dir: str | Path, run_dir: str | Path, *, lora: LoRAConfig | None = None,
    overrides: list[str] | None = None, max_time: str | None = None, which: str = "best", fresh: bool = False,
    quiet: bool = False, distill: DistillConfig | None = None,
) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) BASE_RUN on DATA_DIR into RUN_DIR; ``lora``: train LoRA
    adapters with these settings instead of every weight; ``distill``: learn a teacher run's
    logits (``slmkit.prune.Distillation``). Returns the training summary."""
    base_run, data_dir, run_dir = Path(base_run), Path(data_dir), Path(run_dir)
    if which not in ("best", "last"):
        raise SlmError(f"--which must be best or last, got {which!r}")
    # Everything that can be checked is checked before RUN_DIR is touched.
    base_tok = load_tokenizer(tokenizer_dir(base_run))
    meta = load_meta(data_dir)
    chat = meta.get("kind") == "chat"
    check_extends(base_tok, load_tokenizer(data_dir), data_dir, base_run, same=not chat)
    sections = resolve_sections(run_dir, lora, overrides or [], max_time, fresh)
    if distill is not None:
        if lora is not None:
            raise SlmError("--distill trains every weight: drop --lora")
        sections["distill"] = to_dict(distill)
    model, _, info = load_run(base_run, which=which)  # a LoRA base comes merged (its own base checked)
    checkpoint = Path(info["checkpoint"]).resolve()
    sha = sha256_file(checkpoint / "model.safetensors")
    if (run_dir / "config.toml").is_file() and not fresh:
        recorded = load_toml(run_dir / "config.toml").get("finetune", {}).get("base_sha256")
        if recorded and recorded != sha:
            raise SlmError(f"the base {checkpoint} has changed since {run_dir} started fine-tuning from it: "
                           "restore it, or start over with --fresh")
    sections["finetune"].update(base_run=str(base_run), base_checkpoint=str(checkpoint), base_sha256=sha,
                                base_vocab_size=base_tok.vocab_size, which=which)
    if model.config.vocab_size != base_tok.vocab_size:
        raise SlmError(f"the model of {base_run} has vocab {model.config.vocab_size} but its tokenizer "
                       f"{base_tok.vocab_size}: the run directory is inconsistent")
    if chat:
        open_chat_split(data_dir, "train"), open_chat_split(data_dir, "val")  # complete, or one clear line
    else:
        check_context_fits(data_dir, meta, model.config.block_size)
    grow_embeddings(model, meta["vocab_size"])
    train_cfg = from_dict(TrainConfig, sections["train"], "train")
    if lora is not None and train_cfg.weight_decay > 0 and meta["vocab_size"] > base_tok.vocab_size:
        raise SlmError("train.weight_decay must be 0 for a LoRA run that adds chat tokens (it would change the "
                       "frozen embedding rows): drop the override")
    if train_cfg.parallel == "fsdp" and lora is not None:
        raise SlmError("train.parallel=fsdp is not supported for LoRA runs: use ddp")
    sections = {"model": to_dict(model.config), **sections}
    resolve_device(train_cfg.device, setting="train.device={}")
    dist = init_distributed(train_cfg.device)
    lock = contextlib.ExitStack()  # rank 0 holds RUN_DIR's lock in it until the run ends
    try:
        with lock:
            summary = _run(model, checkpoint, data_dir, run_dir, sections, lora, fresh,
                           quiet or not dist.main, dist, lock)
    finally:
        leave_distributed(dist)
    return summary


def _run(model: GPT, checkpoint: Path, data_dir: Path, run_dir: Path,
         sections: dict[str, dict[str, Any]], lora: LoRAConfig | None, fresh: bool, quiet: bool, dist: Dist,
         lock: contextlib.ExitStack) -> dict[str, Any]:
    """Set up RUN_DIR (rank 0), train, write RUN/adapter/ for a LoRA run; the summary."""
    chat = load_meta(data_dir).get("kind") == "chat"
    resume = setup_run_dir_on_rank0(data_dir, run_dir, sections, fresh, dist, lock)
    trainer = build_finetuning(model, data_dir, run_dir, sections, resume, dist)
    if not quiet:
        what = f"resuming at step {trainer.state.step}" if resume else "starting"
        kind = "chat examples" + (", packed" if sections["finetune"]["pack"] else ", padded") if chat else "text"
        print(f"{what}: fine-tuning {checkpoint} on {data_dir} ({kind}), device {trainer.device}, "
              f"{str(trainer.dtype).replace('torch.', '')}", file=sys.stderr)
        print(describe(trainer.model) if lora is not None else
              f"full fine-tune: {sum(p.numel() for p in trainer.model.parameters()):,} trainable parameters",
              file=sys.stderr)
    summary = trainer.run(quiet=quiet)
    dist.barrier()
    if lora is not None and trainer.weights is not None and dist.main:
        write_adapter(trainer, run_dir, lora_from(sections), checkpoint)
    if not quiet:
        extra = f", val acc {summary['val_acc']:.2%}" if "val_acc" in summary else ""
        print(f"done: {summary['steps']} steps in {summary['time_s']:.0f}s, val loss {summary['val_loss']:.4f}{extra}"
              + (f" (stopped by {summary['stopped_by']})" if summary["stopped_by"] else ""), file=sys.stderr)
    return summary


def lora_from(sections: dict[str, dict[str, Any]]) -> LoRAConfig:
    return from_dict(LoRAConfig, sections["lora"], "lora")


def write_adapter(trainer: Trainer, run_dir: Path, cfg: LoRAConfig, base_checkpoint: Path) -> None:
    """RUN/adapter/: the adapter of best/ alone (``lora.save_adapter``), for tools that take an
    adapter and its base (the PEFT export). Rows of added tokens live in the checkpoints only."""
    best = read_checkpoint(run_dir / "best")
    trainer.model.load_state_dict(trainer.weights.unpack(best["weights"], source=best["path"]))
    save_adapter(run_dir / "adapter", trainer.model, cfg, base=base_checkpoint)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slm finetune``."""
    parser.add_argument("base_run", metavar="BASE_RUN", help="the run to start from (slm train's --out)")
    parser.add_argument("--data", required=True,
                        help="DATA_DIR: chat/instruction records (slm prepare --tokenizer-from BASE_RUN) or text "
                             "prepared with BASE_RUN's tokenizer (continued pretraining)")
    parser.add_argument("--out", required=True, help="RUN_DIR of the fine-tuned model (running again resumes it)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the frozen base")
    add_section_arguments(parser, LoRAConfig)
    add_section_arguments(parser, DistillConfig)
    parser.add_argument("--max-time", help="stop after this much training time, e.g. 10m")
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of BASE_RUN to start from")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming RUN_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes on this machine (launches torchrun; one per GPU)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="e.g. train.lr=1e-4 train.max_steps=300 finetune.pack=false lora.rank=16")


def run_cli(args: argparse.Namespace) -> int:
    """``slm finetune``."""
    flags = {"rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout",
             "targets": "--lora-targets", "rslora": "--rslora"}
    given = [flag for dest, flag in flags.items() if hasattr(args, dest)]
    if given and not args.lora:
        raise SlmError(f"{given[0]} needs --lora")
    lora = None
    if args.lora:
        previous = Path(args.out) / "config.toml"
        table = load_toml(previous).get("lora", {}) if previous.is_file() and not args.fresh else {}
        lora = section_from_args(LoRAConfig, args, "lora", table)
    distill = None
    given = [flag for dest, flag in (("temperature", "--distill-temperature"), ("weight", "--distill-weight"))
             if hasattr(args, dest)]
    if hasattr(args, "teacher"):
        distill = section_from_args(DistillConfig, args, "distill")
    elif given:
        raise SlmError(f"{given[0]} needs --distill TEACHER_RUN")
    parse_duration(args.max_time)
    if args.nproc < 1:
        raise SlmError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        # The same fine-tune as N processes: the [lora] settings travel as lora.* overrides.
        lora_over = [f"lora.{k}={json.dumps(v)}" for k, v in to_dict(lora).items()] if lora else []
        argv = [args.base_run, *args.overrides, *lora_over, "--data", args.data, "--out", args.out,
                "--which", args.which] + ["--lora"] * args.lora + ["--fresh"] * args.fresh + ["--quiet"] * args.quiet
        if args.max_time is not None:
            argv += ["--max-time", args.max_time]
        if distill is not None:
            argv += ["--distill", distill.teacher, "--distill-temperature", str(distill.temperature),
                     "--distill-weight", str(distill.weight)]
        return run_torchrun("slmkit.finetune", argv, args.nproc)
    summary = finetune(args.base_run, args.data, args.out, lora=lora, overrides=args.overrides, max_time=args.max_time,
                       which=args.which, fresh=args.fresh, quiet=args.quiet, distill=distill)
    return {"SIGINT": 130, "SIGTERM": 143}.get(summary["stopped_by"], 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m slmkit.finetune``: the arguments of ``slm finetune``; what torchrun launches."""
    parser = argparse.ArgumentParser(prog="python -m slmkit.finetune", description="fine-tune a run")
    add_arguments(parser)
    args = parse_args_and_overrides(parser, argv)
    try:
        return run_cli(args)
    except SlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
