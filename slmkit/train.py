"""Training: config, learning-rate schedules, the loop, evaluation during training, resume.

``train(data_dir, run_dir, sections)`` is the whole stage; ``slm train`` is a thin wrapper around it.
A RUN_DIR holds ``config.toml`` (the resolved config), ``tokenizer/``, ``last/`` and ``best/``
checkpoints, ``metrics.jsonl`` and ``loss.png``. Running again on the same RUN_DIR resumes from
``last/`` exactly: model, optimizer, schedule, step, RNG and data position.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slmkit import cpu_kernels
from slmkit.checkpoint import build_model, checkpoint_candidates, read_checkpoint, remove_stale_temps, write_checkpoint
from slmkit.config import from_dict, load_preset, load_toml, merge, parse_duration, parse_overrides, to_dict
from slmkit.data import TokenBatches, check_context_fits, eval_batches, load_meta, open_split
from slmkit.distributed import Dist, full_state, grad_sync, init_distributed, load_full_state, split_batch, wrap_model
from slmkit.errors import SlmError
from slmkit.model import GPT, ModelConfig
from slmkit.rundir import check_run_dir, lock_run_dir, plot_metrics, prepare_run_dir
from slmkit.runtime import autocast, can_compile, measure_matmul_peak, pick_dtype, resolve_device
from slmkit.scoring import Tally
from slmkit.tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpointing settings."""

    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_time: str | None = None  # wall-clock budget such as "15m"; the schedule then runs on time
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "constant", "plateau"] = "cosine"
    decay_fraction: float = 0.2  # WSD: the last fraction of training decays linearly
    plateau_factor: float = 0.5  # ReduceLROnPlateau: multiply lr by this ...
    plateau_patience: int = 2  # ... after this many evaluations without improvement
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_interval: int = 200
    eval_batches: int = 20
    checkpoint_interval: int = 200
    log_interval: int = 10
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False  # torch.compile the model (needs a C++ compiler on CPU); the long presets turn it on
    # With several processes: "ddp" keeps a whole model on every rank; "fsdp" shards weights, gradients
    # and optimizer state across the ranks (FSDP2), for models that do not fit one GPU.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    plot: bool = True
    # A step with a non-finite loss or gradient is never applied. Then: "stop" with an error naming
    # the step, "skip" the update and go on, or "rollback" to last/ with the lr times nan_lr_factor.
    nan_policy: Literal["stop", "skip", "rollback"] = "stop"
    nan_max: int = 10  # stop after this many skipped steps in a row, or rollbacks without a new checkpoint
    nan_lr_factor: float = 0.5

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                     "checkpoint_interval", "log_interval", "nan_max"):
            if getattr(self, name) <= 0:
                raise SlmError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SlmError(f"train.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise SlmError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SlmError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise SlmError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not 0 < self.plateau_factor < 1:
            raise SlmError(f"train.plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if not 0 < self.nan_lr_factor < 1:
            raise SlmError(f"train.nan_lr_factor must be in (0, 1), got {self.nan_lr_factor}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise SlmError("train.grad_clip and train.weight_decay must be >= 0")
        try:
            parse_duration(self.max_time)
        except SlmError as e:
            raise SlmError(f"train.max_time: {e}") from None

    @property
    def max_seconds(self) -> float | None:
        return parse_duration(self.max_time)


# --------------------------------------------------------------------------- schedules


class LRSchedule:
    """Learning rate after ``step`` steps and ``elapsed`` seconds of training.

    Warmup is counted in steps. The decay runs on progress in [0, 1]: step / max_steps, or the
    share of the time budget used when that is larger, so that a ``--max-time`` run still decays to
    its minimum when time runs out. It starts where warmup ended on that same clock (the training
    time at the end of warmup is recorded then and kept across resumes), so the rate leaves warmup
    at its peak whichever clock drives it. ``plateau`` keeps a multiplier that falls when
    validation loss stops improving.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.scale = 1.0  # plateau multiplier
        self.best = math.inf
        self.bad_evals = 0
        self.warmup_elapsed: float | None = None  # training seconds when warmup ended

    def progress(self, step: int, elapsed: float) -> float:
        p = step / self.cfg.max_steps
        if self.cfg.max_seconds:
            p = max(p, elapsed / self.cfg.max_seconds)
        return p

    def lr(self, step: int, elapsed: float = 0.0) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if step == cfg.warmup_steps:
            self.warmup_elapsed = elapsed
        lo = cfg.lr * cfg.min_lr_ratio
        # Where warmup ended on the current budget (a changed --max-time on resume moves it too);
        # not recorded (a schedule asked about a later step first, or an older checkpoint): by steps.
        w = min(self.progress(cfg.warmup_steps, self.warmup_elapsed or 0.0), 0.999)
        t = min(max((self.progress(step, elapsed) - w) / (1 - w), 0.0), 1.0)
        if cfg.schedule == "cosine":
            return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))
        if cfg.schedule == "wsd":
            return cfg.lr - (cfg.lr - lo) * min(max((t - (1 - cfg.decay_fraction)) / cfg.decay_fraction, 0.0), 1.0)
        if cfg.schedule == "plateau":
            return max(cfg.lr * self.scale, lo)
        return cfg.lr  # constant

    def observe(self, val_loss: float) -> None:
        """Feed a validation loss (used by the plateau schedule)."""
        if val_loss < self.best - 1e-4:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.cfg.plateau_patience:
                self.scale *= self.cfg.plateau_factor
                self.bad_evals = 0

    def state_dict(self) -> dict[str, float | None]:
        return {"scale": self.scale, "best": self.best if math.isfinite(self.best) else None,
                "bad_evals": self.bad_evals, "warmup_elapsed": self.warmup_elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = state["scale"]
        self.best = math.inf if state["best"] is None else state["best"]
        self.bad_evals = state["bad_evals"]
        self.warmup_elapsed = state.get("warmup_elapsed")


# --------------------------------------------------------------------------- setup helpers


def make_optimizer(model: GPT, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights) only, as in GPT-2."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is one launch for all parameters on CUDA and CPU; mps keeps the default.
    fused = device in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def rng_state(device: str) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: str) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


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
        sections = merge(sections, load_toml(config_file))
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


# --------------------------------------------------------------------------- the run


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # training seconds, summed over resumes
    best_val: float | None = None
    lr_scale: float = 1.0  # lowered by each nan_policy=rollback, kept across resumes
    skipped: int = 0  # steps not applied because of a non-finite loss or gradient


class Trainer:
    """One training run in RUN_DIR. Construct, then call ``run()``."""

    def __init__(
        self, data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], resume: bool, dist: Dist | None = None
    ) -> None:
        dist = dist or Dist()
        self.data_dir, self.run_dir, self.dist = Path(data_dir), Path(run_dir), dist
        self.model_cfg = from_dict(ModelConfig, sections["model"], "model")
        self.cfg = from_dict(TrainConfig, sections["train"], "train")
        self.sections = sections
        self.meta = load_meta(self.data_dir)
        self.token_bytes = load_tokenizer(self.data_dir).token_byte_lengths()
        self.device = resolve_device(self.cfg.device, setting="train.device={}")
        self.dtype = pick_dtype(self.cfg.dtype, self.device)

        torch.manual_seed(self.cfg.seed)
        self.model = GPT(self.model_cfg)
        self.net = wrap_model(self.model, self.cfg.parallel, dist, self.device)  # FSDP swaps parameters: first
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device, enabled=self.dtype == torch.float16)  # fp16 autocast on any device
        self.schedule = LRSchedule(self.cfg)
        self.train_tokens = open_split(self.data_dir, "train")
        self.val_tokens = open_split(self.data_dir, "val")
        self.micro_batch, self.accum = split_batch(self.cfg.batch_size, self.cfg.grad_accum, dist.world_size)
        self.batches = TokenBatches(self.train_tokens, self.model_cfg.block_size, self.micro_batch, self.cfg.seed,
                                    dist.rank, dist.world_size)
        self.state = RunState()
        if resume:
            self._resume()
        if dist.rank > 0:
            # Every rank starts from the same weights (seeded above), but dropout needs its own masks.
            torch.manual_seed(self.cfg.seed + 1000 * dist.rank + self.state.step)
        net = self.net
        self.compiled = False
        if self.cfg.compile:
            why_not = can_compile(self.device)
            if why_not:
                print(f"warning: train.compile=true ignored: {why_not}", file=sys.stderr)
            else:
                # With FSDP this compiles the sharded model whole. Checked on CPU (gloo), where it
                # gives the eager losses; untested on GPUs, where torchtitan compiles block by block.
                net, self.compiled = torch.compile(net), True
        self.forward = net  # the training forward; evaluation uses the plain model (no second compile)
        if self.device == "cpu" and self.dtype == torch.float32 and dist.main and cpu_kernels.available():
            print(f"note: slmkit's CPU kernels are off ({cpu_kernels.available()}); attention and the loss "
                  "use PyTorch's ops", file=sys.stderr)
        self.stop_signal: str | None = None
        self.bad_step: str | None = None  # what was non-finite in the last step, e.g. "loss became nan"
        self.nan_streak = 0

    # ------------------------------------------------------------------ persistence

    def _resume(self) -> None:
        ckpt = read_checkpoint(self.run_dir / "last", with_optimizer=True)
        if ckpt["model_config"] != to_dict(self.model_cfg):
            raise SlmError(f"{self.run_dir} was trained with a different model config: use another --out or --fresh")
        weights = build_model(ckpt["model_config"], ckpt["weights"]).state_dict()  # checks every weight
        s = ckpt["state"]
        try:
            load_full_state(self.model, self.optimizer, weights, ckpt.get("optimizer"))
            for group in self.optimizer.param_groups:  # train.* overrides win over the saved values
                group["betas"] = (self.cfg.beta1, self.cfg.beta2)
            self.state = RunState(step=s["step"], tokens=s["tokens"], elapsed=s["elapsed"], best_val=s.get("best_val"),
                                  lr_scale=s.get("lr_scale", 1.0), skipped=s.get("skipped", 0))
            self.schedule.load_state_dict(s["schedule"])
            if s.get("scaler") and self.scaler.is_enabled():  # fp16: go on at the scale it had reached
                self.scaler.load_state_dict(s["scaler"])
            self.batches.load_state_dict(s["data"])
            set_rng_state(ckpt["rng"], self.device)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise SlmError(f"checkpoint {ckpt['path']} cannot be resumed ({type(e).__name__}: {e}): use --fresh") from None
        if not self.dist.main:  # every rank has read the checkpoint; rank 0 alone tidies RUN_DIR (no races)
            return
        last = self.run_dir / "last"
        if ckpt["path"] != last and last.exists():
            # last/ is corrupt and we resumed from last.old/: set it aside, or the next write would
            # rotate it into last.old/ in place of the good copy.
            shutil.rmtree(self.run_dir / "last.corrupt", ignore_errors=True)
            os.replace(last, self.run_dir / "last.corrupt")
        # Metrics logged after the checkpoint belong to the lost work: drop them so the curve continues.
        self._truncate_metrics(self.state.step)

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return

        def keep(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:  # a line cut short by a kill
                return False

        kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if keep(line)]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "elapsed": self.state.elapsed,
            "best_val": self.state.best_val,
            "lr_scale": self.state.lr_scale,
            "skipped": self.state.skipped,
            "data": self.batches.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} unless fp16; plain numbers, JSON like the rest
            "data_dir": str(self.data_dir),
        }

    def save(self, name: str) -> None:
        """Write checkpoint ``name`` from rank 0. Call it on every rank: FSDP gathers the shards first."""
        weights, optimizer_state = full_state(self.model, self.optimizer if name == "last" else None)
        if not self.dist.main:
            return
        write_checkpoint(
            self.run_dir / name,
            model=self.model,
            weights=weights,
            state=self._checkpoint_state(),
            optimizer_state=optimizer_state,
            rng=rng_state(self.device),
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (every target token) and bits per byte (text tokens over their bytes,
        ``slmkit.scoring``) on the first ``eval_batches`` batches. With several processes each
        evaluates its share of the batches."""
        self.model.eval()
        tally = Tally(self.token_bytes)
        cfg = self.cfg
        batches = list(eval_batches(self.val_tokens, self.model_cfg.block_size, cfg.batch_size, cfg.eval_batches))
        world, rank = self.dist.world_size, self.dist.rank
        # Rank r takes batches r, r + world, ... Every rank runs as many forwards, as FSDP's
        # all-gathers need: one short of a batch in the last round repeats one and does not count it.
        for i in range(rank, math.ceil(len(batches) / world) * world, world):
            x, y = batches[min(i, len(batches) - 1)]
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device, self.dtype):
                logits, _ = self.model(x)
            if i < len(batches):
                tally.add(logits, y)
        self.model.train()
        tally.set_totals([v * self.dist.world_size for v in self.dist.all_mean(tally.totals())])
        metrics = tally.metrics()
        return {"val_loss": metrics["loss"], "val_bpb": metrics["bpb"]}

    # ------------------------------------------------------------------ the loop

    def done(self) -> bool:
        if self.state.step >= self.cfg.max_steps:
            return True
        return bool(self.cfg.max_seconds and self.state.elapsed >= self.cfg.max_seconds)

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        lr = self.schedule.lr(self.state.step, self.state.elapsed) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for i in range(self.accum):
            x, y = self.batches.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # With several processes, gradients are reduced only after the last micro-batch of the step.
            with grad_sync(self.net, i == self.accum - 1):
                with autocast(self.device, self.dtype):
                    _, loss = self.forward(x, y, return_logits=False)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.item()
        loss = loss_sum / self.accum
        if self.dist.world_size > 1:
            # The global loss, so that a NaN on any rank withholds the update on every rank alike.
            loss = self.dist.all_mean([loss])[0]
        self.scaler.unscale_(self.optimizer)
        # max_norm=inf measures the norm without clipping (grads * 1.0, bit for bit the same). Under
        # FSDP the gradients are DTensor shards and the norm comes back replicated: the global one.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf).item()
        # Never train on NaN: a non-finite loss or gradient withholds the update (fp16's scaler
        # skips its own overflow steps, so with it only the loss counts).
        self.bad_step = None
        if not math.isfinite(loss):
            self.bad_step = f"loss became {loss}"
        elif not math.isfinite(norm) and not self.scaler.is_enabled():
            self.bad_step = f"gradient norm became {norm}"
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += self.cfg.grad_accum * self.cfg.batch_size * self.model_cfg.block_size
        return loss

    def _after_bad_step(self) -> bool:
        """Apply train.nan_policy to a step whose update was withheld; True when it rolled back."""
        from tqdm import tqdm

        cfg, what, step = self.cfg, self.bad_step, self.state.step
        hint = "lower train.lr or check the data"
        if cfg.nan_policy == "stop":
            raise SlmError(f"{what} at step {step}: {hint}, or set train.nan_policy=skip or rollback")
        self.nan_streak += 1
        if self.nan_streak > cfg.nan_max:
            what_in_a_row = "skipped steps" if cfg.nan_policy == "skip" else "rollbacks"
            raise SlmError(f"{what} at step {step} after {cfg.nan_max} {what_in_a_row} in a row: {hint}")
        if cfg.nan_policy == "skip":
            self.state.skipped += 1
            self.log({"step": step, "skipped": what})
            tqdm.write(f"warning: {what} at step {step}: update skipped ({self.state.skipped} so far)", file=sys.stderr)
            return False
        # rollback: reload last/ (weights, optimizer, data position, RNG) and go on with a lower lr.
        # Time spent and the best val loss seen are facts, not state to roll back.
        scale, elapsed, best = self.state.lr_scale * cfg.nan_lr_factor, self.state.elapsed, self.state.best_val
        self._resume()
        self.state.lr_scale, self.state.elapsed = scale, elapsed
        self.state.best_val = min((v for v in (best, self.state.best_val) if v is not None), default=None)
        self.log({"step": self.state.step, "rollback": what, "lr_scale": scale})
        self.save("last")  # so a crash now still resumes with the lower lr
        tqdm.write(f"warning: {what} at step {step}: rolled back to step {self.state.step}, "
                   f"lr scaled by {scale:g}", file=sys.stderr)
        return True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name

    def run(self, quiet: bool = False) -> dict[str, Any]:
        """Train until max_steps, the time budget or a signal; returns the final summary."""
        from tqdm import tqdm

        self.model.train()
        cfg = self.cfg
        tokens_per_step = cfg.grad_accum * cfg.batch_size * self.model_cfg.block_size
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        # With a time budget the bar runs on seconds, so its ETA is the budget, not max_steps.
        timed = cfg.max_seconds is not None
        # A bar on a terminal; into a file or a pipe, one plain line per log_interval instead of
        # a carriage-return update per step.
        show = not quiet and self.dist.main
        plain = show and not sys.stderr.isatty()
        bar = tqdm(total=round(cfg.max_seconds) if timed else cfg.max_steps,
                   initial=round(self.state.elapsed) if timed else self.state.step,
                   unit="s" if timed else "step", disable=not show or plain, dynamic_ncols=True, file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}{postfix}]" if timed else None)
        last_eval: dict[str, float] = {}
        # The MFU peak: the better of a measurement now and one at the end, so that another job
        # busy at one of the two moments does not inflate the MFU.
        peak = measure_matmul_peak(self.device, self.dtype)
        start_tokens, start_step, t_start = self.state.tokens, self.state.step, time.perf_counter()
        if cfg.nan_policy == "rollback" and not checkpoint_candidates(self.run_dir / "last"):
            self.save("last")  # something to roll back to, even at step 0
        try:
            while not self.done() and self.stop_signal is None:
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                if self.dist.world_size > 1:
                    # One small all-reduce so that every rank logs the global loss and takes the same
                    # decisions (time budget, signals) at the same step.
                    loss, dt, stop = self.dist.all_mean([loss, dt, float(self.stop_signal is not None)])
                    if stop and self.stop_signal is None:
                        self.stop_signal = "signal on another rank"
                if self.compiled and self.state.step == start_step + 1 and not quiet and self.dist.main:
                    print(f"torch.compile: the first step took {dt:.0f}s (compilation included)", file=sys.stderr)
                self.state.elapsed += dt
                if self.bad_step is not None:
                    if self._after_bad_step():  # rolled back: go on from the checkpoint's step
                        if not timed:
                            bar.n = self.state.step
                        continue
                elif cfg.nan_policy == "skip":
                    self.nan_streak = 0  # skipped steps count in a row
                step = self.state.step
                if self.bad_step is None and (step % cfg.log_interval == 0 or step == 1):
                    self.log({"step": step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                              "tokens": self.state.tokens, "elapsed": round(self.state.elapsed, 3),
                              "tok_per_s": tokens_per_step / dt})
                    if plain:
                        print(self._log_line(step, loss, tokens_per_step / dt), file=sys.stderr, flush=True)
                bar.update(min(dt, bar.total - bar.n) if timed else 1)
                postfix = {"step": step, "loss": f"{loss:.3f}", "tok/s": f"{tokens_per_step / dt:,.0f}"}
                if last_eval:
                    postfix["val"] = f"{last_eval['val_loss']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                if step % cfg.eval_interval == 0 or self.done():
                    last_eval = self._eval_and_keep_best()
                    if plain:
                        print(f"step {step}: val loss {last_eval['val_loss']:.4f}, val bpb {last_eval['val_bpb']:.4f}",
                              file=sys.stderr, flush=True)
                if step % cfg.checkpoint_interval == 0 and not self.done():  # the final one is written below
                    self.save("last")
                    if cfg.nan_policy == "rollback":
                        self.nan_streak = 0  # rollbacks count until a new checkpoint shows progress
            if not last_eval or last_eval.get("step") != self.state.step:
                last_eval = self._eval_and_keep_best()
            self.save("last")
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError (CUDA) is a RuntimeError too
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
                raise
            raise SlmError(f"out of memory at step {self.state.step + 1}: lower train.batch_size (raise train.grad_accum "
                           "to keep the tokens per step) or the model size, then run again to resume") from None
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        wall = time.perf_counter() - t_start
        tok_per_s = (self.state.tokens - start_tokens) / max(wall, 1e-9)
        # MFU against the matmul peak, measured on every rank (each rank has its own cores or GPU);
        # the attention term follows nanoGPT/PaLM. It includes compilation, evaluation and
        # checkpoint time, since tok/s does.
        peak = max(peak, measure_matmul_peak(self.device, self.dtype))
        peak = self.dist.all_mean([peak])[0] * self.dist.world_size
        summary = {
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "time_s": round(self.state.elapsed, 1),
            "tok_per_s": tok_per_s,
            "val_loss": last_eval["val_loss"],
            "val_bpb": last_eval["val_bpb"],
            "mfu": self.model.flops_per_token() * tok_per_s / peak,
            "peak_flops": peak,
            "stopped_by": self.stop_signal,
        }
        if self.cfg.plot and self.dist.main:
            plot_metrics(self.run_dir)
        return summary

    def _log_line(self, step: int, loss: float, tok_per_s: float) -> str:
        """The plain progress line printed where no bar can be drawn (a log file, a pipe)."""
        cfg, s = self.cfg, self.state
        if cfg.max_seconds:
            where = f"{s.elapsed:,.0f}/{cfg.max_seconds:,.0f}s"
        else:
            where = f"{step}/{cfg.max_steps}"
        return (f"step {step} ({where}): loss {loss:.4f}, lr {self.optimizer.param_groups[0]['lr']:.3g}, "
                f"{tok_per_s:,.0f} tok/s")

    def _eval_and_keep_best(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.schedule.observe(metrics["val_loss"])
        self.log({"step": self.state.step, **metrics})
        if self.state.best_val is None or metrics["val_loss"] < self.state.best_val:
            self.state.best_val = metrics["val_loss"]
            self.save("best")
        if self.cfg.plot and self.dist.main:
            plot_metrics(self.run_dir)
        return {**metrics, "step": self.state.step}


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
    try:
        with lock:
            resume = _prepare_on_rank0(data_dir, run_dir, sections, fresh, dist, lock)
            trainer = Trainer(data_dir, run_dir, sections, resume, dist)
            quiet = quiet or not dist.main
            if not quiet:
                n = trainer.model.num_params()
                what = f"resuming at step {trainer.state.step}" if resume else "starting"
                procs = f", {dist.world_size} processes" if dist.world_size > 1 else ""
                print(f"{what}: {n / 1e6:.2f}M parameters, device {trainer.device}, "
                      f"{str(trainer.dtype).replace('torch.', '')}{procs}", file=sys.stderr)
            summary = trainer.run(quiet=quiet)
            dist.barrier()
    finally:
        if dist.world_size > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()
    if not quiet:
        print(
            f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['time_s']:.0f}s "
            f"({summary['tok_per_s']:,.0f} tok/s), val loss {summary['val_loss']:.4f}, val bpb {summary['val_bpb']:.4f}, "
            f"MFU {summary['mfu']:.0%} of a measured {summary['peak_flops'] / 1e9:,.0f} GFLOP/s"
            + (f" (stopped by {summary['stopped_by']})" if summary["stopped_by"] else ""),
            file=sys.stderr,
        )
    return summary


def _setup_run_dir(data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], fresh: bool,
                   lock: contextlib.ExitStack) -> bool:
    """Check RUN_DIR, lock it (a second slm train on it is refused), tidy it and prepare it."""
    check_run_dir(run_dir, fresh)
    lock.enter_context(lock_run_dir(run_dir))
    remove_stale_temps(run_dir)  # left by a run killed while writing a checkpoint
    return prepare_run_dir(data_dir, run_dir, sections, fresh)


def _prepare_on_rank0(data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], fresh: bool, dist: Dist,
                      lock: contextlib.ExitStack) -> bool:
    """``_setup_run_dir`` on rank 0 only; the other ranks get its answer, or its error."""
    if dist.world_size == 1:
        return _setup_run_dir(data_dir, run_dir, sections, fresh, lock)
    import torch.distributed

    answer: list[Any] = [None]
    if dist.main:
        try:
            answer[0] = _setup_run_dir(data_dir, run_dir, sections, fresh, lock)
        except SlmError as e:
            answer[0] = e
    torch.distributed.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], SlmError):
        raise answer[0]
    return bool(answer[0])


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slm train`` (and of ``python -m slmkit.train``, which torchrun runs)."""
    parser.add_argument("--data", required=True, help="DATA_DIR written by slm prepare")
    parser.add_argument("--out", required=True, help="RUN_DIR for checkpoints, logs and plots")
    parser.add_argument("--preset", help="a shipped preset (tiny, quickstart, cpu-15min, stories260k, stories15m, ...)")
    parser.add_argument("--config", help="a TOML file with [model] and [train] sections")
    parser.add_argument("--max-time", help="stop after this much training time, e.g. 15m or 1h")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming RUN_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes on this machine (launches torchrun; one per GPU)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. model.n_layer=4 train.lr=1e-3")


def launch_torchrun(args: argparse.Namespace) -> int:
    """Run this same training as ``torchrun --standalone --nproc_per_node N -m slmkit.train ...``."""
    import subprocess

    argv = ["--data", args.data, "--out", args.out]
    for flag, value in (("--preset", args.preset), ("--config", args.config), ("--max-time", args.max_time)):
        if value is not None:
            argv += [flag, value]
    argv += ["--fresh"] * args.fresh + ["--quiet"] * args.quiet + list(args.overrides)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # CPU ranks share the cores; torchrun's default of one thread each is right only for many ranks.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "slmkit.train", *argv]
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
