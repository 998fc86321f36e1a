"""``slm export LORA_RUN --format run --out RUN_DIR``: a LoRA run merged into a plain RUN_DIR.

A LoRA run's checkpoints hold only its adapters (and any new token rows) and name their base run,
which must stay where it was. The merged run holds the whole model (``W + scale B A`` in every
adapted linear, the chat-token rows, the run's tokenizer and template) as an ordinary run at step 0:
it no longer needs the base, ``slm quantize``, ``slm export`` to any format, ``slm finetune`` (a
second round on it) and ``slm train`` take it like any run, and its decode runs on every backend.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.config import from_dict, load_toml
from slmkit.errors import SlmError


def run_train_config(run_dir: str | Path):
    """The ``[train]`` section of RUN_DIR's config.toml (defaults when absent), for a derived run."""
    from slmkit.train import TrainConfig

    path = Path(run_dir) / "config.toml"
    return from_dict(TrainConfig, load_toml(path).get("train", {}) if path.is_file() else {}, "train")


def export_merged_run(run_dir: str | Path, out: str | Path, which: str = "best") -> Path:
    """Write LoRA run ``run_dir``'s ``best`` (or ``last``) checkpoint, merged, as the new RUN_DIR ``out``."""
    from slmkit.checkpoint import load_run
    from slmkit.rundir import create_run

    model, tokenizer, info = load_run(run_dir, which=which)  # a LoRA run loads merged
    if "lora" not in info:
        raise SlmError(f"{run_dir} is not a LoRA run, so there is nothing to merge: it is a plain run already "
                       "(--format run writes a LoRA run merged)")
    return create_run(out, model, tokenizer, run_train_config(run_dir), merged_from=str(Path(run_dir).resolve()),
                      merged_step=info.get("step"))
