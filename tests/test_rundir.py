"""slmkit.rundir: RUN_DIR's tokenizer copy survives a run killed while it is being replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slmkit.errors import SlmError
from slmkit.files import is_swap_leftover
from slmkit.rundir import check_run_dir, prepare_run_dir, setup_run_dir
from slmkit.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"model": {"n_layer": 1}, "train": {"batch_size": 2}}
TEXT = "Once upon a time there was a little cat."

# A child that prepares RUN_DIR and SIGKILLs itself: after the new copy's first file ("copy"), or
# right after the folders changed places, before the old copy is deleted ("swap").
CHILD = """
import os, shutil, signal, sys
from pathlib import Path
from slmkit import files
from slmkit.rundir import prepare_run_dir

def die_after(fn):
    def wrapped(*args, **kwargs):
        fn(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return wrapped

if sys.argv[3] == "copy":
    shutil.copy2 = die_after(shutil.copy2)
else:
    files._exchange = die_after(files._exchange)
prepare_run_dir(Path(sys.argv[1]), Path(sys.argv[2]), {"model": {"n_layer": 1}, "train": {"batch_size": 2}}, True)
"""


def kill_while_preparing(data_dir: Path, run: Path, where: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), str(run), where], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(is_swap_leftover(p.name, "tokenizer") for p in run.iterdir())  # it died mid-swap


@pytest.mark.parametrize("where", ["copy", "swap"])
def test_a_kill_mid_swap_leaves_a_usable_tokenizer(data_dir, tmp_path, where):
    """Killed while writing the new copy, the run keeps the old one; killed right after the swap, it
    has the new one: either way tokenizer/ is there and loads, and the next setup tidies up."""
    if where == "swap" and not sys.platform.startswith("linux"):
        pytest.skip("the one-step folder swap is Linux's renameat2")
    run = tmp_path / "run"
    prepare_run_dir(data_dir, run, SECTIONS, fresh=True)
    (run / "tokenizer" / "marker").write_text("the old copy")
    ids = load_tokenizer(data_dir).encode(TEXT)
    kill_while_preparing(data_dir, run, where)
    assert load_tokenizer(run / "tokenizer").encode(TEXT) == ids
    assert (run / "tokenizer" / "marker").exists() == (where == "copy")
    with contextlib.ExitStack() as lock:
        assert setup_run_dir(data_dir, run, SECTIONS, fresh=False, lock=lock) is False
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.toml", "tokenizer"]
    assert load_tokenizer(run / "tokenizer").encode(TEXT) == ids


def test_a_new_run_killed_during_its_first_copy_is_taken_up(data_dir, tmp_path):
    """A run killed before config.toml holds only atomic_dir's own folder and the lock: check_run_dir
    accepts it as the run's (the names it allows are the swap's, from files.is_swap_leftover)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("")
    kill_while_preparing(data_dir, run, "copy")
    assert not (run / "tokenizer").exists() and not (run / "config.toml").exists()
    check_run_dir(run, fresh=False)
    (run / ".tokenizer.json").write_text("")  # not the swap's: the folder is someone else's
    with pytest.raises(SlmError, match="not a slmkit run directory"):
        check_run_dir(run, fresh=False)
    (run / ".tokenizer.json").unlink()
    with contextlib.ExitStack() as lock:
        setup_run_dir(data_dir, run, SECTIONS, fresh=False, lock=lock)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.toml", "tokenizer"]
    assert load_tokenizer(run / "tokenizer").encode(TEXT) == load_tokenizer(data_dir).encode(TEXT)
