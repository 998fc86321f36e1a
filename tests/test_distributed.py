"""Data parallel training through torchrun, on CPU with gloo and two processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmkit.config import from_dict
from slmkit.distributed import split_batch
from slmkit.errors import SlmError
from slmkit.train import TrainConfig, train

from conftest import REPO, TINY

# A constant schedule after warmup, so that the first half of a run does not depend on max_steps.
OVER = TINY + ["train.grad_accum=2", "train.schedule=constant", "train.warmup_steps=2", "train.log_interval=1",
               "train.eval_interval=4", "train.checkpoint_interval=4"]


def curve(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(l)[key] for l in (run / "metrics.jsonl").read_text().splitlines() if f'"{key}"' in l]


def torchrun(data_dir: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slmkit.train", "--nproc", "2", "--data", str(data_dir), "--out", str(out),
           "--quiet", *OVER, *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_split_batch_keeps_the_global_batch():
    assert split_batch(16, 4, 2) == (16, 2)  # ranks share the accumulation steps ...
    assert split_batch(16, 1, 2) == (8, 1)  # ... or else the micro-batch
    assert split_batch(16, 3, 1) == (16, 3)
    with pytest.raises(SlmError, match="multiple of 2"):
        split_batch(3, 1, 2)


@pytest.mark.slow
def test_ddp_follows_the_single_process_curve_and_resumes(data_dir, tmp_path):
    single = tmp_path / "single"
    train(data_dir, single, overrides=OVER + ["train.max_steps=8"], quiet=True)

    ddp = tmp_path / "ddp"
    torchrun(data_dir, ddp, "train.max_steps=4")
    assert len(curve(ddp)) == 4
    shutil.copytree(ddp, tmp_path / "ddp_then_one")
    torchrun(data_dir, ddp, "train.max_steps=8")  # resumes at step 4 on two processes
    assert curve(ddp) == pytest.approx(curve(single), rel=1e-4)

    # The same checkpoint also resumes on one process: the data position is global.
    one = tmp_path / "ddp_then_one"
    summary = train(data_dir, one, overrides=OVER + ["train.max_steps=8"], quiet=True)
    assert summary["steps"] == 8
    assert curve(one) == pytest.approx(curve(single), rel=1e-4)
    # Only rank 0 wrote: no leftovers from another rank (the .old folders are the previous checkpoints).
    assert sorted(p.name for p in ddp.iterdir() if not p.name.startswith(".")) == [
        "best", "best.old", "config.toml", "last", "last.old", "metrics.jsonl", "tokenizer"]


def test_parallel_is_ddp_or_fsdp():
    assert from_dict(TrainConfig, {}, "train").parallel == "ddp"
    assert from_dict(TrainConfig, {"parallel": "fsdp"}, "train").parallel == "fsdp"
    with pytest.raises(SlmError, match=r"train.parallel = 'zero3' is not allowed: choose one of 'ddp' \| 'fsdp'"):
        from_dict(TrainConfig, {"parallel": "zero3"}, "train")


# Two micro-batches per rank and step (so gradient sync is off for the first), and 3 validation
# batches, which 2 ranks cannot share evenly: FSDP's collectives must still line up.
FSDP = ["train.grad_accum=4", "train.eval_batches=3"]


@pytest.mark.slow
def test_fsdp_follows_the_single_process_curve_resumes_and_writes_the_usual_checkpoint(data_dir, tmp_path):
    single = tmp_path / "single"
    train(data_dir, single, overrides=OVER + FSDP + ["train.max_steps=8"], quiet=True)

    fsdp = tmp_path / "fsdp"
    torchrun(data_dir, fsdp, *FSDP, "train.parallel=fsdp", "train.max_steps=4")
    shutil.copytree(fsdp, tmp_path / "fsdp_then_one")
    torchrun(data_dir, fsdp, *FSDP, "train.parallel=fsdp", "train.max_steps=8")  # resumes at step 4
    assert len(curve(fsdp)) == 8
    assert curve(fsdp) == pytest.approx(curve(single), rel=1e-4)
    assert curve(fsdp, "val_loss") == pytest.approx(curve(single, "val_loss"), rel=1e-4)

    # The checkpoint is the single-process one: the same files, tensor names, shapes and values.
    for name in ("model.safetensors", "optimizer.safetensors"):
        ours, theirs = load_file(fsdp / "last" / name), load_file(single / "last" / name)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=1e-6, msg=k)
    state, single_state = (json.loads((r / "last" / "state.json").read_text()) for r in (fsdp, single))
    assert state["optimizer"] == single_state["optimizer"]
    assert sorted(p.name for p in fsdp.iterdir() if not p.name.startswith(".")) == [
        "best", "best.old", "config.toml", "last", "last.old", "metrics.jsonl", "tokenizer"]

    # An FSDP checkpoint from two processes resumes on one, without FSDP.
    one = tmp_path / "fsdp_then_one"
    assert train(data_dir, one, overrides=OVER + FSDP + ["train.max_steps=8"], quiet=True)["steps"] == 8
    assert curve(one) == pytest.approx(curve(single), rel=1e-4)
