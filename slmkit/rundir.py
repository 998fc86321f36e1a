"""Run directories: what RUN_DIR holds besides checkpoints, and who may write it.

``setup_run_dir`` checks, locks, tidies and prepares RUN_DIR for a training run: ``prepare_run_dir``
writes config.toml and the tokenizer copy and says whether the run resumes; ``lock_run_dir`` keeps a
second ``slm train`` out. ``RunState`` and ``checkpoint_state`` are what every checkpoint's
state.json holds, which the training loop resumes from; ``create_run`` writes a new run at step 0 in
that same form (``slm import-hf``). ``append_record``/``iter_records`` write and read metrics.jsonl
and ``plot_metrics`` draws loss.png from it. Used by training; imports no later stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run-dir lock
    fcntl = None

from slmkit.checkpoint import checkpoint_candidates, remove_stale_temps, write_checkpoint
from slmkit.config import dump_toml, load_toml, to_dict
from slmkit.data import TokenBatches
from slmkit.errors import SlmError
from slmkit.files import atomic_dir
from slmkit.schedules import LRSchedule

if TYPE_CHECKING:
    from slmkit.distributed import Dist
    from slmkit.model import GPT
    from slmkit.tokenizer import Tokenizer
    from slmkit.trainer import TrainConfig


@dataclass
class RunState:
    """A run's progress, kept in every checkpoint's state.json (``checkpoint_state``)."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # training seconds, summed over resumes
    best_val: float | None = None
    lr_scale: float = 1.0  # lowered by each nan_policy=rollback, kept across resumes
    skipped: int = 0  # steps not applied because of a non-finite loss or gradient

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        """The progress in a checkpoint's state.json (older checkpoints lack the last two fields)."""
        return cls(step=state["step"], tokens=state["tokens"], elapsed=state["elapsed"],
                   best_val=state.get("best_val"), lr_scale=state.get("lr_scale", 1.0), skipped=state.get("skipped", 0))


def checkpoint_state(progress: RunState, *, data: dict[str, Any], schedule: dict[str, Any], scaler: dict[str, Any],
                     **notes: Any) -> dict[str, Any]:
    """state.json's contents (``write_checkpoint`` adds the optimizer's param groups): the progress,
    the ``state_dict()`` of the batch source (``data``), of the lr schedule and of the fp16 gradient
    scaler ({} when it is off; plain numbers, JSON like the rest), and ``notes`` such as ``data_dir``.
    The training loop resumes from exactly these keys."""
    return {**asdict(progress), "data": data, "schedule": schedule, "scaler": scaler, **notes}


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
CONFIG_TMP = ".config.toml.tmp"


def _own_file(name: str) -> bool:
    """What a run killed before config.toml leaves: the lock, the config's temp file and the
    tokenizer swap's folders (``files.atomic_dir``'s ``.tokenizer.tmp-*`` and ``.tokenizer.old-*``)."""
    return name in (LOCK, CONFIG_TMP) or name.startswith((".tokenizer.tmp-", ".tokenizer.old-"))


def check_run_dir(run_dir: Path, fresh: bool) -> None:
    """Refuse a folder that holds something else, before anything is written into it."""
    if not run_dir.is_dir() or fresh or (run_dir / "config.toml").exists() or checkpoint_candidates(run_dir / "last"):
        return
    if any(not _own_file(p.name) for p in run_dir.iterdir()):
        raise SlmError(f"{run_dir} exists and is not a slmkit run directory: choose an empty or new --out")


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to create a run in a folder that exists and holds anything."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise SlmError(f"--out {run_dir} already exists and is not empty: choose a new RUN_DIR")


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
    with atomic_dir(tok_dir) as tmp:
        for name in ("tokenizer.json", "encoder.json", "vocab.bpe", "tokenizer_meta.json"):
            if (data_dir / name).exists():
                shutil.copy2(data_dir / name, tmp / name)
    write_config(run_dir, sections)
    if fresh or not has_last:  # also a run killed before its first checkpoint: it starts over
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return has_last and not fresh


def write_config(run_dir: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Write RUN_DIR/config.toml (the resolved [model] and [train] sections) atomically."""
    (run_dir / CONFIG_TMP).write_text(dump_toml(sections), encoding="utf-8")
    os.replace(run_dir / CONFIG_TMP, run_dir / "config.toml")


def setup_run_dir(data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], fresh: bool,
                  lock: contextlib.ExitStack) -> bool:
    """Check RUN_DIR, lock it (a second slm train on it is refused; the lock is held in ``lock``),
    tidy it and prepare it; returns True when the run resumes from ``last/``."""
    check_run_dir(run_dir, fresh)
    lock.enter_context(lock_run_dir(run_dir))
    remove_stale_temps(run_dir)  # left by a run killed while writing a checkpoint or the tokenizer
    return prepare_run_dir(data_dir, run_dir, sections, fresh)


def setup_run_dir_on_rank0(data_dir: Path, run_dir: Path, sections: dict[str, dict[str, Any]], fresh: bool,
                           dist: Dist, lock: contextlib.ExitStack) -> bool:
    """``setup_run_dir`` on rank 0 only; the other ranks get its answer, or its error."""
    if dist.world_size == 1:
        return setup_run_dir(data_dir, run_dir, sections, fresh, lock)
    import torch.distributed

    answer: list[Any] = [None]
    if dist.main:
        try:
            answer[0] = setup_run_dir(data_dir, run_dir, sections, fresh, lock)
        except SlmError as e:
            answer[0] = e
    torch.distributed.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], SlmError):
        raise answer[0]
    return bool(answer[0])


def create_run(run_dir: str | Path, model: GPT, tokenizer: Tokenizer, train_cfg: TrainConfig, *,
               weights: dict[str, Any] | None = None, quantization: dict[str, Any] | None = None,
               **notes: Any) -> Path:
    """Write ``model`` as a new RUN_DIR at step 0 (config.toml, tokenizer/, last/ and best/) that
    ``slm train --data DATA --out RUN_DIR`` resumes, on data prepared with the same tokenizer.

    The checkpoints hold the weights and the state a pretraining run has before its first step
    (``checkpoint_state`` of a fresh ``RunState``, data position and schedule); no optimizer
    state, so training starts with fresh AdamW moments. ``notes`` go into state.json (e.g.
    ``imported_from``). ``weights`` and ``quantization`` store packed weights instead of the
    model's own (``slm quantize``, see ``write_checkpoint``). RUN_DIR must be new or empty; on any
    failure it is removed again.
    """
    run_dir = Path(run_dir)
    check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_config(run_dir, {"model": to_dict(model.config), "train": to_dict(train_cfg)})
        with atomic_dir(run_dir / "tokenizer") as tmp:
            tokenizer.save(tmp)
        state = checkpoint_state(RunState(), data=TokenBatches.start_state(train_cfg.seed),
                                 schedule=LRSchedule(train_cfg).state_dict(), scaler={}, **notes)
        for name in ("last", "best"):
            write_checkpoint(run_dir / name, model=model, state=state, weights=weights, quantization=quantization)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def truncate_records(run_dir: Path, step: int) -> None:
    """Drop the metrics.jsonl records after ``step`` (logged by work a resume throws away)."""
    path = run_dir / "metrics.jsonl"
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


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON record to RUN_DIR/metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def iter_records(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Records of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                yield json.loads(line)
            except ValueError:  # empty, or cut short by a kill
                continue
