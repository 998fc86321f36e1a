"""Fault injection: kills, signals, a full disk, NaN losses, corrupt checkpoints, a busy RUN_DIR.

Every test runs on the tiny corpus of conftest.py. Subprocess tests run ``python -m slmkit.cli
train`` for real (so SIGKILL is a real SIGKILL); the rest inject the fault in-process. See
docs/reliability.md for what each fault does to a run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slmkit import checkpoint as ckpt_mod
from slmkit.checkpoint import load_run, read_checkpoint, write_checkpoint
from slmkit.cli import main
from slmkit.errors import SlmError
from slmkit.model import GPT, ModelConfig
from slmkit.rundir import lock_run_dir
from slmkit.train import LRSchedule, TrainConfig, Trainer, train

from conftest import REPO, TINY

# Dropout on, so an exact resume must also restore the RNG; a checkpoint every 2 steps.
OVER = TINY + ["train.max_steps=12", "train.checkpoint_interval=2", "train.eval_interval=6",
               "train.log_interval=1", "model.dropout=0.1"]


def curve(run: Path) -> list[tuple]:
    """(step, train loss, val loss) records: what must match bit for bit (not times or tok/s)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs if "loss" in r or "val_loss" in r]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["weights"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def slm(*args, capsys=None) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, (capsys.readouterr().err if capsys else "")


def one_error_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    # Notes and warnings (such as which CPU kernels are used) may come first; the error is one line.
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning: ", "note: "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "r"
    train(data_dir, out, overrides=OVER, quiet=True)
    return out


def spawn_train(data_dir: Path, run: Path, *extra: str, slow_checkpoint: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    if slow_checkpoint:
        env["SLM_TEST_SLOW_CHECKPOINT"] = str(slow_checkpoint)
    cmd = [sys.executable, "-m", "slmkit.cli", "train", "--data", str(data_dir), "--out", str(run), "--quiet",
           *OVER, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"train ended (rc {proc.returncode}) before the fault: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to inject the fault")
        time.sleep(0.005)


def logged_step(run: Path) -> int:
    """The highest step logged so far (a half-written last line is ignored)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(seed, data_dir, reference, tmp_path, capsys):
    rng = random.Random(seed)
    target, delay = rng.randint(1, 8), rng.uniform(0.0, 0.1)
    run = tmp_path / "r"
    # A short sleep inside each checkpoint write makes some kills land mid-write (and leaves the
    # run, 12 steps, far from done when the kill comes).
    proc = spawn_train(data_dir, run, slow_checkpoint=0.1)
    wait_for(proc, lambda: logged_step(run) >= target)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # The same command again (in-process here) resumes from the last complete checkpoint.
    code, err = slm("train", "--data", data_dir, "--out", run, "--quiet", *OVER, capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert curve(run) == curve(reference)
    assert same_weights(weights(run / "last"), weights(reference / "last"))
    assert not list(run.glob(".*.tmp-*"))  # the killed write's temp dir was cleaned up


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(data_dir, reference, tmp_path, capsys):
    run = tmp_path / "r"
    proc = spawn_train(data_dir, run, slow_checkpoint=1.0)  # each write sleeps 1 s after model.safetensors
    # Wait for a write that replaces an existing last/ (the first one has nothing to protect).
    wait_for(proc, lambda: (run / "last").is_dir() and any(run.glob(".last.tmp-*")))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert any(run.glob(".last.tmp-*"))  # really killed half-way through the write
    step = read_checkpoint(run / "last")["state"]["step"]
    assert step >= 2
    code, err = slm("train", "--data", data_dir, "--out", run, "--quiet", *OVER, capsys=capsys)
    assert code == 0, err
    assert curve(run) == curve(reference)
    assert same_weights(weights(run / "last"), weights(reference / "last"))
    assert not list(run.glob(".*.tmp-*"))


# --------------------------------------------------------------------------- SIGINT / SIGTERM


def test_sigterm_writes_a_checkpoint_and_exits_143(data_dir, tmp_path):
    run = tmp_path / "r"
    proc = spawn_train(data_dir, run, "train.max_steps=100000")
    wait_for(proc, lambda: logged_step(run) >= 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    state = read_checkpoint(run / "last")["state"]
    assert state["step"] >= 3 and state["step"] == logged_step(run)  # nothing after the checkpoint is lost


def test_sigint_in_process_writes_a_checkpoint_and_exits_130(data_dir, tmp_path, monkeypatch, capsys):
    real_step = Trainer.train_step

    def step_then_ctrl_c(self):
        loss = real_step(self)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, caught by the real handler
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    code, err = slm("train", "--data", data_dir, "--out", tmp_path / "r", "--quiet", *TINY, "train.max_steps=50",
                    capsys=capsys)
    assert code == 130 and "Traceback" not in err
    assert read_checkpoint(tmp_path / "r" / "last")["state"]["step"] == 3


# --------------------------------------------------------------------------- disk full


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(data_dir, tmp_path, monkeypatch, capsys):
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def save_until_full(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # model, optimizer, rng of the step-2 checkpoint fit; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", save_until_full)
    run = tmp_path / "r"
    code, err = slm("train", "--data", data_dir, "--out", run, "--quiet", *OVER, capsys=capsys)
    line = one_error_line(code, err, "disk full", str(run / "last"))
    assert "resume" in line
    assert read_checkpoint(run / "last")["state"]["step"] == 2  # intact
    assert not list(run.glob(".*.tmp-*"))  # the half-written checkpoint is gone, freeing its space


def test_disk_full_elsewhere_is_one_line_too(data_dir, tmp_path, monkeypatch, capsys):
    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.run_dir / "metrics.jsonl"))

    monkeypatch.setattr(Trainer, "log", full)
    code, err = slm("train", "--data", data_dir, "--out", tmp_path / "r", "--quiet", *OVER, capsys=capsys)
    one_error_line(code, err, "disk full", "metrics.jsonl")


# --------------------------------------------------------------------------- out of memory


def test_out_of_memory_is_one_line_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    real_step = Trainer.train_step

    def step_until_oom(self):
        if self.state.step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_until_oom)
    run = tmp_path / "r"
    code, err = slm("train", "--data", data_dir, "--out", run, "--quiet", *OVER, capsys=capsys)
    one_error_line(code, err, "out of memory at step 5", "train.batch_size")
    assert read_checkpoint(run / "last")["state"]["step"] == 4


# --------------------------------------------------------------------------- NaN / inf


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a broken gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def inject(monkeypatch, bad_calls, kind: str = "nan") -> None:
    """Make the training forward pass number n (1-based, = step with grad_accum 1) go bad."""
    real = GPT.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if torch.is_grad_enabled() and out[1] is not None:
            count["n"] += 1
            if bad_calls == "all" or count["n"] in bad_calls:
                loss = out[1] * float("nan") if kind == "nan" else _InfGrad.apply(out[1])
                return (out[0], loss, *out[2:])
        return out

    monkeypatch.setattr(GPT, "forward", forward)


NAN_RUN = TINY + ["train.max_steps=8", "train.checkpoint_interval=2", "train.eval_interval=100", "train.log_interval=1"]


def test_nan_stop_policy_names_the_step_and_never_applies_it(data_dir, tmp_path, monkeypatch):
    inject(monkeypatch, {3})
    with pytest.raises(SlmError, match=r"loss became nan at step 3: lower train.lr.*nan_policy"):
        train(data_dir, tmp_path / "r", overrides=NAN_RUN, quiet=True)
    last = read_checkpoint(tmp_path / "r" / "last")
    assert last["state"]["step"] == 2 and all(torch.isfinite(w).all() for w in last["weights"].values())


@pytest.mark.parametrize("kind, what", [("nan", "loss became nan"), ("inf_grad", "gradient norm became")])
def test_nan_skip_policy_withholds_the_update(kind, what, data_dir, tmp_path, monkeypatch):
    inject(monkeypatch, {8}, kind)  # the last step, so last/ (step 8) and last.old/ (step 7) can be compared
    run = tmp_path / "r"
    summary = train(data_dir, run, overrides=NAN_RUN + ["train.nan_policy=skip", "train.checkpoint_interval=1"],
                    quiet=True)
    assert summary["steps"] == 8
    last, before = read_checkpoint(run / "last"), read_checkpoint(run / "last.old")
    assert last["state"]["step"] == 8 and before["state"]["step"] == 7 and last["state"]["skipped"] == 1
    assert same_weights(last["weights"], before["weights"])  # step 8 changed nothing
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if what in r.get("skipped", "")] == [8]  # logged
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 8))  # no NaN in the curve


def test_nan_skip_policy_stops_after_too_many_in_a_row(data_dir, tmp_path, monkeypatch):
    inject(monkeypatch, "all")
    with pytest.raises(SlmError, match=r"loss became nan at step 4 after 3 skipped steps in a row"):
        train(data_dir, tmp_path / "r", overrides=NAN_RUN + ["train.nan_policy=skip", "train.nan_max=3"], quiet=True)


def test_nan_rollback_policy_reloads_last_and_halves_the_lr(data_dir, tmp_path, monkeypatch):
    inject(monkeypatch, {5})  # last/ is at step 4
    run = tmp_path / "r"
    summary = train(data_dir, run, overrides=NAN_RUN + ["train.nan_policy=rollback"], quiet=True)
    assert summary["steps"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "rollback": "loss became nan", "lr_scale": 0.5} in records
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # one clean curve
    cfg = TrainConfig(lr=3e-3, warmup_steps=5, max_steps=8)
    step5 = next(r for r in records if r.get("step") == 5 and "loss" in r)
    assert step5["lr"] == pytest.approx(0.5 * LRSchedule(cfg).lr(4, 4 / 8))
    state = read_checkpoint(run / "last")["state"]
    assert state["lr_scale"] == 0.5  # kept across resumes
    monkeypatch.undo()
    train(data_dir, run, overrides=NAN_RUN + ["train.nan_policy=rollback", "train.max_steps=9"], quiet=True)
    rec9 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-2]
    assert rec9["step"] == 9 and rec9["lr"] == pytest.approx(0.5 * LRSchedule(
        TrainConfig(lr=3e-3, warmup_steps=5, max_steps=9)).lr(8, 8 / 9))


def test_nan_rollback_before_any_checkpoint_and_gives_up(data_dir, tmp_path, monkeypatch):
    inject(monkeypatch, "all")  # from step 1: rolls back to the step-0 checkpoint, again and again
    with pytest.raises(SlmError, match=r"loss became nan at step 1 after 2 rollbacks in a row"):
        train(data_dir, tmp_path / "r", overrides=NAN_RUN + ["train.nan_policy=rollback", "train.nan_max=2"],
              quiet=True)
    assert read_checkpoint(tmp_path / "r" / "last")["state"]["lr_scale"] == 0.25


def test_nan_policy_is_validated(data_dir, tmp_path, capsys):
    code, err = slm("train", "--data", data_dir, "--out", tmp_path / "r", "train.nan_policy=ignore", capsys=capsys)
    one_error_line(code, err, "train.nan_policy", "'stop' | 'skip' | 'rollback'")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- corrupt checkpoints


def flip_byte(path: Path, where: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, name", [(truncate, "model.safetensors"), (flip_byte, "optimizer.safetensors"),
                                          (flip_byte, "state.json"), (truncate, "manifest.json")])
def test_corrupt_last_falls_back_to_the_previous_checkpoint(damage, name, data_dir, reference, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(reference, run)  # last/ at step 12, last.old/ at step 10
    damage(run / "last" / name)
    ckpt = read_checkpoint(run / "last")
    assert ckpt["path"] == run / "last.old" and ckpt["state"]["step"] == 10
    assert "warning: " in capsys.readouterr().err
    # Resuming redoes steps 11-12 and lands exactly where the uninterrupted run did.
    train(data_dir, run, overrides=OVER, quiet=True)
    assert (run / "last.corrupt").is_dir()  # set aside, not rotated into last.old
    assert same_weights(weights(run / "last"), weights(reference / "last"))
    assert curve(run) == curve(reference)


def test_corrupt_checkpoint_without_a_fallback_is_a_clear_error(data_dir, reference, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "last.old")
    flip_byte(run / "last" / "model.safetensors", 100)
    code, err = slm("train", "--data", data_dir, "--out", run, "--quiet", *OVER, capsys=capsys)
    one_error_line(code, err, "model.safetensors is corrupt (checksum mismatch)")


def test_corrupt_best_falls_back_to_last_for_inference(reference, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "best.old")
    flip_byte(run / "best" / "model.safetensors")
    _, _, info = load_run(run, which="best")
    assert info["checkpoint"] == str(run / "last")
    assert "corrupt" in capsys.readouterr().err


def test_manifest_must_vouch_for_every_file(tmp_path):
    target = tmp_path / "last"
    torch.manual_seed(0)
    write_checkpoint(target, model=GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8)),
                     state={"step": 1})
    manifest = json.loads((target / "manifest.json").read_text())
    for bad, msg in [({k: v for k, v in manifest["files"].items() if k != "model.safetensors"}, "does not list"),
                     ({**manifest["files"], "../../../dev/zero": "x"}, "bad manifest.json")]:
        (target / "manifest.json").write_text(json.dumps({"files": bad}))
        with pytest.raises(SlmError, match=msg):
            read_checkpoint(target)


# --------------------------------------------------------------------------- the run-dir lock


def test_a_second_train_on_a_busy_run_dir_is_refused(data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    with lock_run_dir(run):  # what a running slm train holds
        code, err = slm("train", "--data", data_dir, "--out", run, "--quiet", *OVER, capsys=capsys)
        one_error_line(code, err, f"{run} is in use by another slm train (pid {os.getpid()})", "another --out")
        assert not (run / "config.toml").exists()  # nothing touched
    code, _ = slm("train", "--data", data_dir, "--out", run, "--quiet", *OVER, "train.max_steps=2")
    assert code == 0  # released when the holder closes it (or dies: see the SIGKILL tests, which resume)
