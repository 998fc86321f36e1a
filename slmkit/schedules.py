"""Learning-rate schedules: warmup, then cosine, warmup-stable-decay, constant or plateau.

The training loop asks ``LRSchedule.lr(step, elapsed)`` before every step and feeds it each
validation loss (``observe``); ``state_dict`` goes into every checkpoint so a resumed run takes
the same rate at every step as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmkit.trainer import TrainConfig


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
        """How far training is, in [0, 1] and beyond: by steps, or by time when that is further."""
        p = step / self.cfg.max_steps
        if self.cfg.max_seconds:
            p = max(p, elapsed / self.cfg.max_seconds)
        return p

    def lr(self, step: int, elapsed: float = 0.0) -> float:
        """The rate for the step after ``step`` steps, ``elapsed`` training seconds in."""
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
        """Plain numbers (JSON): the plateau's scale, best and count, and the end of warmup."""
        return {"scale": self.scale, "best": self.best if math.isfinite(self.best) else None,
                "bad_evals": self.bad_evals, "warmup_elapsed": self.warmup_elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``."""
        self.scale = state["scale"]
        self.best = math.inf if state["best"] is None else state["best"]
        self.bad_evals = state["bad_evals"]
        self.warmup_elapsed = state.get("warmup_elapsed")
