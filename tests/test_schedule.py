"""The learning-rate schedules (slmkit.schedules): warmup, cosine, WSD, constant, plateau, and
the time budget driving them (warmup in steps, decay in time)."""

from __future__ import annotations

import json
import time

import pytest

from slmkit.schedules import LRSchedule
from slmkit.train import TrainConfig, train

from conftest import TINY


def lrs(**kw):
    cfg = TrainConfig(**kw)
    s = LRSchedule(cfg)
    return cfg, s, [s.lr(step, step / cfg.max_steps) for step in range(cfg.max_steps)]


def test_cosine_warmup_then_decay_to_min():
    cfg, _, curve = lrs(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert curve[0] == pytest.approx(0.1) and curve[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(curve[10:], curve[11:]))  # monotone decay after warmup
    assert curve[-1] == pytest.approx(0.1, abs=1e-3)
    assert LRSchedule(cfg).lr(100, 1.0) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays():
    _, s, curve = lrs(lr=1.0, warmup_steps=0, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert curve[50] == 1.0 and curve[79] == 1.0
    assert curve[90] < 1.0 and s.lr(100, 1.0) == pytest.approx(0.1)


def test_constant_schedule():
    _, _, curve = lrs(lr=0.5, warmup_steps=0, max_steps=10, schedule="constant")
    assert curve == [0.5] * 10


def test_plateau_halves_after_patience_and_state_roundtrip():
    cfg, s, _ = lrs(lr=1.0, warmup_steps=0, max_steps=10, schedule="plateau", plateau_patience=2)
    for loss in [3.0, 2.0, 2.5, 2.4]:
        s.observe(loss)
    assert s.lr(5, 0.5) == 0.5
    s2 = LRSchedule(cfg)
    s2.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert s2.lr(5, 0.5) == 0.5 and s2.best == 2.0


def test_time_budget_drives_the_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, max_steps=10_000, max_time="10s")
    s = LRSchedule(cfg)
    # Half the time used: the cosine is half way although few steps were taken.
    assert s.lr(10, 5.0) == pytest.approx(0.55)


def timed_curve(cfg: TrainConfig, seconds_per_step: float, schedule: LRSchedule | None = None,
                steps: range | None = None) -> list[float]:
    """The lr of each step as the Trainer asks for it, on a clock that advances ``seconds_per_step``
    a step, until the time budget is used."""
    s = schedule or LRSchedule(cfg)
    out = []
    for step in steps or range(cfg.max_steps):
        if step * seconds_per_step >= cfg.max_seconds:
            break
        out.append(s.lr(step, step * seconds_per_step))
    return out


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_decay_starts_at_the_peak_when_time_drives_progress(schedule: str) -> None:
    # 10 warmup steps take a quarter of the 60 s budget, though only 1% of max_steps.
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=1000, max_time="60s", min_lr_ratio=0.1,
                      schedule=schedule)
    s = LRSchedule(cfg)
    curve = timed_curve(cfg, 1.5, s)
    assert len(curve) == 40
    assert curve[9] == pytest.approx(1.0) and curve[10] == pytest.approx(1.0)  # no drop after warmup
    assert all(a >= b for a, b in zip(curve[10:], curve[11:]))
    # Continuous: the step after that is within a step's share of the cosine (1 - cos(pi / 30)) / 2.
    assert curve[11] > 0.995
    assert s.lr(40, 60.0) == pytest.approx(0.1)  # and it reaches the minimum when time runs out


def test_the_end_of_warmup_survives_a_resume() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=1000, max_time="60s")
    whole = timed_curve(cfg, seconds_per_step=1.5)
    first = LRSchedule(cfg)
    timed_curve(cfg, 1.5, first, range(20))
    resumed = LRSchedule(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert timed_curve(cfg, 1.5, resumed, range(20, 40)) == whole[20:]


def test_without_a_time_budget_the_curve_is_the_step_cosine() -> None:
    """Driven by steps, the recorded start is warmup_steps / max_steps: the same curve as a
    schedule asked about any step out of order (such as one rebuilt to check a logged lr)."""
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100)
    s = LRSchedule(cfg)
    in_order = [s.lr(step) for step in range(100)]
    assert [LRSchedule(cfg).lr(step) for step in range(100)] == in_order


class FakeClock:
    """time with a perf_counter that advances a fixed amount per call: the training loop reads it
    before and after each step, so every step takes exactly one tick."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the real time module
        return getattr(time, name)


def test_a_timed_run_keeps_the_peak_after_warmup(data_dir, tmp_path, monkeypatch) -> None:
    import slmkit.trainer

    monkeypatch.setattr(slmkit.trainer, "time", FakeClock(tick=0.5))  # 0.5 s a step (the loop's clock)
    over = TINY + ["train.warmup_steps=5", "train.max_steps=1000", "train.max_time=12s", "train.log_interval=1",
                   "train.eval_interval=1000", "train.checkpoint_interval=1000"]
    summary = train(data_dir, tmp_path / "r", overrides=over, quiet=True)
    assert summary["steps"] == 24  # 12 s of 0.5 s steps
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert len(lrs) == 24
    assert lrs[4] == pytest.approx(3e-3) and lrs[5] == pytest.approx(3e-3)  # steps 5 and 6: the peak
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 0.5e-3
