"""Data parallel training through torchrun, on CPU with gloo and two processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmkit.errors import SlmError
from slmkit.train import split_batch, train

from conftest import REPO, TINY

# A constant schedule after warmup, so that the first half of a run does not depend on max_steps.
OVER = TINY + ["train.grad_accum=2", "train.schedule=constant", "train.warmup_steps=2", "train.log_interval=1",
               "train.eval_interval=4", "train.checkpoint_interval=4"]


def curve(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


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
