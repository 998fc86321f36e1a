"""Run directories: what RUN_DIR holds besides checkpoints, and who may write it.

``prepare_run_dir`` creates or checks RUN_DIR (config.toml, the tokenizer copy) and says whether the
run resumes; ``lock_run_dir`` keeps a second ``slm train`` out; ``iter_records`` reads
metrics.jsonl and ``plot_metrics`` draws loss.png from it. Used by training; imports no later stage.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run-dir lock
    fcntl = None

from slmkit.checkpoint import checkpoint_candidates
from slmkit.config import dump_toml, load_toml
from slmkit.errors import SlmError


def plot_metrics(run_dir: Path) -> None:
    """Draw train and validation loss from metrics.jsonl into loss.png (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(iter_records(run_dir))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="val", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


LOCK = ".lock"
OWN_FILES = {LOCK, ".tokenizer.tmp", ".config.toml.tmp"}  # what a run killed before config.toml leaves


def check_run_dir(run_dir: Path, fresh: bool) -> None:
    """Refuse a folder that holds something else, before anything is written into it."""
    if not run_dir.is_dir() or fresh or (run_dir / "config.toml").exists() or checkpoint_candidates(run_dir / "last"):
        return
    if any(p.name not in OWN_FILES for p in run_dir.iterdir()):
        raise SlmError(f"{run_dir} exists and is not a slmkit run directory: choose an empty or new --out")


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on RUN_DIR/.lock; close the returned file to release it.

    flock dies with the process, so a killed run never leaves a stale lock behind.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+", encoding="utf-8")
    if fcntl is None:  # pragma: no cover
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise SlmError(f"{run_dir} is in use by another slm train (pid {pid}): wait for it or use another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def prepare_run_dir(data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], fresh: bool) -> bool:
    """Create or check RUN_DIR; returns True when the run resumes from ``last/``.

    A new run writes config.toml and copies the tokenizer. An existing run must have the same model
    config and the same vocab as the data; ``--fresh`` starts over but keeps the old checkpoints until
    the new run writes its own.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    has_last = bool(checkpoint_candidates(run_dir / "last"))
    config_path = run_dir / "config.toml"
    tok_dir = run_dir / "tokenizer"
    if has_last and not fresh:
        old = load_toml(config_path) if config_path.exists() else {}
        if old.get("model") != sections["model"]:
            diff = sorted(k for k in set(old.get("model", {})) | set(sections["model"])
                          if old.get("model", {}).get(k) != sections["model"].get(k))
            raise SlmError(
                f"{run_dir} holds a run with a different model config ({', '.join('model.' + k for k in diff)}): "
                "use another --out, or --fresh to start over"
            )
        # Same vocab size is not enough: token ids must mean the same strings as in the checkpoint.
        for name in ("tokenizer.json", "encoder.json", "vocab.bpe"):
            ours, theirs = tok_dir / name, data_dir / name
            if ours.exists() and (not theirs.exists() or ours.read_bytes() != theirs.read_bytes()):
                raise SlmError(f"{data_dir} was made with a different tokenizer than the run in {run_dir}: "
                               "use the DATA_DIR it was trained on, or --fresh to start over")
    tmp = run_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("tokenizer.json", "encoder.json", "vocab.bpe", "tokenizer_meta.json"):
        if (data_dir / name).exists():
            shutil.copy2(data_dir / name, tmp / name)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)
    (run_dir / ".config.toml.tmp").write_text(dump_toml(sections), encoding="utf-8")
    os.replace(run_dir / ".config.toml.tmp", config_path)
    if fresh or not has_last:  # also a run killed before its first checkpoint: it starts over
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return has_last and not fresh


def iter_records(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Records of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                yield json.loads(line)
            except ValueError:  # empty, or cut short by a kill
                continue
