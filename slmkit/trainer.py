"""The training loop: ``Trainer`` trains the model it is handed, on the batches it is handed, and
checks it with the evaluator it is handed.

Pretraining (``slmkit.train``) hands it a GPT, ``TokenBatches`` over DATA_DIR and validation on
the val split; fine-tuning hands it other parts. Whatever the parts, the loop keeps its promises:
exact resume from ``last/`` (weights, optimizer, schedule, RNG, data position, gradient scaler, best
validation loss), DDP/FSDP, torch.compile, SIGINT/SIGTERM checkpoints, the NaN policy, and the
metrics.jsonl records and loss.png of RUN_DIR. ``TrainConfig`` is its ``[train]`` section.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from slmkit import cpu_kernels
from slmkit.checkpoint import build_model, checkpoint_candidates, read_checkpoint, write_checkpoint
from slmkit.config import parse_duration, to_dict
from slmkit.distributed import Dist, full_state, grad_sync, load_full_state, split_batch, wrap_model
from slmkit.errors import SlmError
from slmkit.model import GPT
from slmkit.rundir import RunState, append_record, checkpoint_state, plot_metrics, truncate_records
from slmkit.runtime import autocast, can_compile, measure_matmul_peak
from slmkit.schedules import LRSchedule


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


class BatchSource(Protocol):
    """What the loop needs of its training data: this rank's next micro-batch, and a position
    to save and restore (JSON-able) so that a resumed run sees exactly the batches it would have.

    A batch is (inputs, targets) with targets of -1 not scored, or (inputs, targets, segments) for
    rows of packed examples (``GPT.forward``'s ``segments``)."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Evaluator = Callable[[], dict[str, float]]  # -> {"val_loss": ..., and any other metrics to log}

# What a training step minimises, when not the model's own cross-entropy: called as
# objective(forward, x, y, segments) inside autocast, it returns the mean loss over the scored
# targets (y != -1) of the micro-batch, so the step's normalisation (``step_divisors``) holds.
# Distillation (``slmkit.prune.Distillation``) is one.
Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class CheckpointWeights(Protocol):
    """Which of the model's weights its checkpoints hold, when not all of them: an adapter run
    (``slmkit.lora.AdapterWeights``) writes only what trains, the frozen base stays in its own run."""

    def pack(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors to write, from the model's whole state dict."""
        ...

    def unpack(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's whole state dict from the tensors read back (SlmError if they do not fit)."""
        ...


def step_divisors(counts: list[int], world_size: int, global_count: int) -> list[float]:
    """What each micro-batch's mean loss is divided by, so that the optimizer step minimises the
    sum of the losses of all its scored targets over their count in the whole step (every
    micro-batch of every rank; DDP averages the ranks' gradients, hence ``world_size``).

    Micro-batch i scores ``counts[i]`` targets with mean loss L_i, so its share is L_i * n_i / N =
    L_i / (N / (n_i * world)). With equal counts the divisor is exactly ``grad_accum``, so
    pretraining divides by the same number as a plain mean of means. A micro-batch with nothing to
    score has a zero loss and gradient; its divisor is irrelevant (1).
    """
    return [global_count / (n * world_size) if n else 1.0 for n in counts]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad (an adapter run freezes the rest), with weight
    decay on matrices (linear and embedding weights) only, as in GPT-2."""
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


class Trainer:
    """One training run in RUN_DIR, of the parts it is handed. Construct, then call ``run()``.

    ``model``: a GPT built on the CPU (seeded by the caller); the trainer moves it to ``device``,
    wraps it for DDP/FSDP, compiles it if asked and optimizes its parameters that require grad.
    ``batches``: this rank's micro-batches (``BatchSource``; ``split_batch`` gives their size).
    ``evaluator``: scores the model, returns metrics with ``val_loss`` (best/ keeps the lowest);
    it may leave the model in eval mode. ``notes`` go into every checkpoint's state.json.
    ``resume``: continue from RUN_DIR's ``last/``. ``weights``: what checkpoints hold of the model
    (``CheckpointWeights``); by default every weight. ``objective``: the loss a step minimises
    (``Objective``); by default the model's cross-entropy.
    """

    def __init__(
        self, model: GPT, batches: BatchSource, evaluator: Evaluator, cfg: TrainConfig, run_dir: Path, *,
        device: str, dtype: torch.dtype, dist: Dist | None = None, resume: bool = False,
        notes: dict[str, Any] | None = None, weights: CheckpointWeights | None = None,
        objective: Objective | None = None,
    ) -> None:
        dist = dist or Dist()
        self.model, self.batches, self.evaluator, self.cfg = model, batches, evaluator, cfg
        self.run_dir, self.dist, self.device, self.dtype = Path(run_dir), dist, device, dtype
        self.notes = dict(notes or {})
        self.weights, self.objective = weights, objective
        self.net = wrap_model(model, cfg.parallel, dist, device)  # FSDP swaps parameters: first
        self.optimizer = make_optimizer(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)  # fp16 autocast on any device
        self.schedule = LRSchedule(cfg)
        self.micro_batch, self.accum = split_batch(cfg.batch_size, cfg.grad_accum, dist.world_size)
        self.state = RunState()
        if resume:
            self._resume()
        if dist.rank > 0:
            # Every rank starts from the same weights (seeded above), but dropout needs its own masks.
            torch.manual_seed(cfg.seed + 1000 * dist.rank + self.state.step)
        net = self.net
        self.compiled = False
        if cfg.compile:
            why_not = can_compile(device)
            if why_not:
                print(f"warning: train.compile=true ignored: {why_not}", file=sys.stderr)
            else:
                # With FSDP this compiles the sharded model whole. Checked on CPU (gloo), where it
                # gives the eager losses; untested on GPUs, where torchtitan compiles block by block.
                net, self.compiled = torch.compile(net), True
        self.forward = net  # the training forward; evaluation uses the plain model (no second compile)
        if device == "cpu" and dtype in (torch.float32, torch.bfloat16) and dist.main and cpu_kernels.available():
            print(f"note: slmkit's CPU kernels are off ({cpu_kernels.available()}); attention and the loss "
                  "use PyTorch's ops", file=sys.stderr)
        self.stop_signal: str | None = None
        self.bad_step: str | None = None  # what was non-finite in the last step, e.g. "loss became nan"
        self.nan_streak = 0

    # ------------------------------------------------------------------ persistence

    def _resume(self) -> None:
        ckpt = read_checkpoint(self.run_dir / "last", with_optimizer=True)
        if ckpt["model_config"] != to_dict(self.model.config):
            raise SlmError(f"{self.run_dir} was trained with a different model config: use another --out or --fresh")
        if self.weights is not None:
            weights = self.weights.unpack(ckpt["weights"])
        else:
            weights = build_model(ckpt["model_config"], ckpt["weights"]).state_dict()  # checks every weight
        s = ckpt["state"]
        try:
            load_full_state(self.model, self.optimizer, weights, ckpt.get("optimizer"))
            for group in self.optimizer.param_groups:  # train.* overrides win over the saved values
                group["betas"] = (self.cfg.beta1, self.cfg.beta2)
            self.state = RunState.from_checkpoint(s)
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
        truncate_records(self.run_dir, self.state.step)

    def save(self, name: str) -> None:
        """Write checkpoint ``name`` from rank 0. Call it on every rank: FSDP gathers the shards first."""
        weights, optimizer_state = full_state(self.model, self.optimizer if name == "last" else None)
        if not self.dist.main:
            return
        if self.weights is not None:
            weights = self.weights.pack(weights)
        state = checkpoint_state(self.state, data=self.batches.state_dict(), schedule=self.schedule.state_dict(),
                                 scaler=self.scaler.state_dict(), **self.notes)
        write_checkpoint(self.run_dir / name, model=self.model, weights=weights, state=state,
                         optimizer_state=optimizer_state, rng=rng_state(self.device))

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            append_record(self.run_dir, record)

    def evaluate(self) -> dict[str, float]:
        """The evaluator's metrics (every rank calls it: with several processes each evaluates its
        share); the model goes back to training mode after it."""
        metrics = self.evaluator()
        self.model.train()
        return metrics

    # ------------------------------------------------------------------ the loop

    def done(self) -> bool:
        if self.state.step >= self.cfg.max_steps:
            return True
        return bool(self.cfg.max_seconds and self.state.elapsed >= self.cfg.max_seconds)

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's loss: the mean
        over every scored target of the step (all micro-batches, all ranks)."""
        lr = self.schedule.lr(self.state.step, self.state.elapsed) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The step's micro-batches first, to count the targets each scores (-1 is not scored).
        batches = [self.batches.next_batch() for _ in range(self.accum)]
        counts = [int((b[1] != -1).sum()) for b in batches]
        world = self.dist.world_size
        total = sum(counts)
        if world > 1:
            total = round(self.dist.all_mean([float(total)])[0] * world)  # float64: exact for any real count
        divisors = step_divisors(counts, world, total)
        loss_sum, tokens = 0.0, 0
        for i, (batch, divisor) in enumerate(zip(batches, divisors)):
            x, y, *segments = (t.to(self.device, non_blocking=True) for t in batch)
            tokens += x.numel()
            # With several processes, gradients are reduced only after the last micro-batch of the step.
            with grad_sync(self.net, i == self.accum - 1):
                with autocast(self.device, self.dtype):
                    seg = segments[0] if segments else None
                    if self.objective is None:
                        _, loss = self.forward(x, y, return_logits=False, segments=seg)
                    else:
                        loss = self.objective(self.forward, x, y, seg)
                self.scaler.scale(loss / divisor).backward()
            loss_sum += loss.item() * counts[i] * world  # this rank's share of the step's loss, times world
        loss = loss_sum / max(total, 1)
        if world > 1:
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
        self.state.tokens += tokens * self.dist.world_size  # every rank takes as many (split_batch)
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
                t0, tokens0 = time.perf_counter(), self.state.tokens
                loss = self.train_step()
                dt = time.perf_counter() - t0
                tokens_per_step = self.state.tokens - tokens0
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
                    if plain:  # e.g. "step 200: val loss 1.2345, val bpb 0.9876"
                        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in last_eval.items() if k != "step")
                        print(f"step {step}: {shown}", file=sys.stderr, flush=True)
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
            **{k: v for k, v in last_eval.items() if k != "step"},  # the evaluator's: val_loss, val_bpb, ...
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
