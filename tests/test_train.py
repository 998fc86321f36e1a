import json
import math
import os
from pathlib import Path

import pytest
import torch

from slmkit import checkpoint as ckpt_mod
from slmkit.checkpoint import load_run, read_checkpoint, write_checkpoint
from slmkit.errors import SlmError
from slmkit.model import GPT, ModelConfig
from slmkit.train import LRSchedule, TrainConfig, Trainer, train

from conftest import TINY, train_killed_after


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


def test_run_writes_artifacts_and_learns(run_dir):
    for name in ["config.toml", "metrics.jsonl", "loss.png", "last/model.safetensors", "best/model.safetensors",
                 "tokenizer/tokenizer.json", "last/optimizer.safetensors", "last/manifest.json"]:
        assert (run_dir / name).exists(), name
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert len(vals) == 2 and vals[-1] < math.log(300)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _curve(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_resume_continues_the_same_loss_curve(data_dir, tmp_path, monkeypatch):
    over = TINY + ["train.max_steps=16", "train.checkpoint_interval=4", "train.eval_interval=8",
                   "train.log_interval=1", "model.dropout=0.1"]
    full = tmp_path / "full"
    train(data_dir, full, overrides=over, quiet=True)

    # Interrupt the second run after step 10 (last checkpoint at step 8), as a kill would.
    part = tmp_path / "part"
    train_killed_after(10, data_dir, part, over, monkeypatch)
    assert read_checkpoint(part / "last")["state"]["step"] == 8
    summary = train(data_dir, part, overrides=over, quiet=True)
    assert summary["steps"] == 16
    assert _curve(part) == _curve(full)  # bit for bit, including dropout's RNG and the data order
    a = read_checkpoint(full / "last")["weights"]
    b = read_checkpoint(part / "last")["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_writes_a_checkpoint_and_stops(data_dir, tmp_path, monkeypatch):
    real_step = Trainer.train_step

    def step_then_signal(self):
        loss = real_step(self)
        if self.state.step == 3:
            self.stop_signal = "SIGINT"
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    summary = train(data_dir, tmp_path / "r", overrides=TINY + ["train.max_steps=50"], quiet=True)
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == 3
    assert read_checkpoint(tmp_path / "r" / "last")["state"]["step"] == 3


def test_max_time_stops_the_run(data_dir, tmp_path):
    summary = train(data_dir, tmp_path / "r", overrides=TINY + ["train.max_steps=100000"], max_time="2s", quiet=True)
    assert 0 < summary["steps"] < 100000 and summary["time_s"] >= 2


def test_incompatible_run_dir_is_refused_and_kept(data_dir, run_dir, tmp_path):
    before = (run_dir / "last" / "model.safetensors").read_bytes()
    with pytest.raises(SlmError, match="different model config.*model.n_layer"):
        train(data_dir, run_dir, overrides=TINY + ["model.n_layer=3"], quiet=True)
    assert (run_dir / "last" / "model.safetensors").read_bytes() == before


def test_data_with_other_vocab_is_refused(run_dir, corpus_file, tmp_path):
    from slmkit.data import prepare

    other = tmp_path / "other"
    prepare([str(corpus_file)], other, vocab_size=280, val_fraction=0.1)
    with pytest.raises(SlmError, match="model.vocab_size"):
        train(other, run_dir, overrides=TINY, quiet=True)


def test_not_a_run_dir_is_refused(data_dir, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SlmError, match="not a slmkit run directory"):
        train(data_dir, tmp_path, overrides=TINY, quiet=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _tiny_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last"
    write_checkpoint(target, model=_tiny_model(0), state={"step": 1})
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, *a, **k):
        calls["n"] += 1
        real_save(tensors, path, *a, **k)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(target, model=_tiny_model(1), state={"step": 2})
    assert calls["n"] == 1
    assert read_checkpoint(target)["state"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # no temp dirs left behind


def test_kill_between_renames_falls_back_to_old(tmp_path, monkeypatch):
    target = tmp_path / "last"
    write_checkpoint(target, model=_tiny_model(0), state={"step": 1})
    real_replace = os.replace

    def replace_once_then_die(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(ckpt_mod.os, "replace", replace_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(target, model=_tiny_model(1), state={"step": 2})
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert not target.exists()
    assert read_checkpoint(target)["state"]["step"] == 1  # from last.old


def test_corrupt_checkpoint_is_detected(tmp_path):
    target = tmp_path / "best"
    write_checkpoint(target, model=_tiny_model(0), state={"step": 1})
    data = bytearray((target / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (target / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SlmError, match="corrupt"):
        read_checkpoint(target)


def test_load_run_gives_an_eval_model(run_dir):
    model, tok, info = load_run(run_dir)
    assert not model.training and info["step"] == 60 and tok.vocab_size == model.config.vocab_size
